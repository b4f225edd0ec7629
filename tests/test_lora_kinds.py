"""A LoRA file's layers are told apart by kind as the WebUI's Lora extension does, and only LoRA is read.

The parts per kind are those the extension's `create_module` of each network_*.py asks for (A1111 v1.10.1,
extensions-builtin/Lora), tried in the order of networks.py's `module_types`.
"""

import pytest
import torch

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.lora_export import _group
from dreambooth_ext.train.lora_kinds import BY_NAME, KINDS, LORA, kind_of

LAYER = "lora_unet_down_blocks_0_attentions_0_proj_in"
EXAMPLES = {  # a layer of each kind, as its writer saves it
    "lora": ("lora_up.weight", "lora_down.weight", "alpha"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"),
    "ia3": ("weight", "on_input"),
    "lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
    "glora": ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"),
    "oft": ("oft_diag",),
}


def _layer(parts, name=LAYER):
    return {f"{name}.{part}": torch.ones(2, 2) if part != "alpha" else torch.tensor(2.0) for part in parts}


def test_every_kind_has_an_example_and_the_order_is_the_webuis():
    assert [k.name for k in KINDS] == ["lora", "loha", "ia3", "lokr", "full", "norm", "glora", "oft"]
    assert set(EXAMPLES) == set(BY_NAME)
    assert [k.name for k in KINDS if k.trainable] == ["lora"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_layer_gets_its_kind(name):
    assert kind_of(EXAMPLES[name]) is BY_NAME[name]


def test_lokr_takes_each_factor_whole_or_in_two():
    for w1 in (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")):
        for w2 in (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b")):
            assert kind_of(w1 + w2).name == "lokr"
    assert kind_of(("lokr_w1_a", "lokr_w2")) is None  # half a factor is no layer


@pytest.mark.parametrize("name", sorted(set(EXAMPLES) - {"lora"}))
def test_a_layer_of_another_kind_is_refused_by_its_name(name):
    with pytest.raises(UserError) as err:
        _group(_layer(EXAMPLES[name]))
    msg = str(err.value)
    assert f"is a {BY_NAME[name].label} layer" in msg and "LyCORIS" in msg and "\n" not in msg
    assert all(k.label in msg for k in KINDS if not k.trainable)  # the sentence lists every kind it cannot read


def test_a_lora_layer_is_read_and_one_with_more_parts_refused():
    (weights,) = _group(_layer(EXAMPLES["lora"])).values()
    assert weights.alpha == 2.0 and weights.down.shape == (2, 2)
    for extra in ("dora_scale", "lora_mid.weight", "scale"):
        with pytest.raises(UserError, match=f"has {extra}: only plain LoRA"):
            _group(_layer(EXAMPLES["lora"] + (extra,)))
    with pytest.raises(UserError, match="lacks its lora_down or lora_up weight"):
        _group(_layer(("lora_down.weight", "alpha")))
    with pytest.raises(UserError, match="has lora_A.weight, lora_B.weight: only plain LoRA"):
        _group(_layer(("lora_A.weight", "lora_B.weight")))  # peft's names are not read
    assert set(LORA.parts) == {"lora_up.weight", "lora_down.weight", "alpha"}
