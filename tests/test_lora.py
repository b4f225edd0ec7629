"""LoRA adapters on tiny models: where peft puts them, what they train, and their state's round trip.

The files they become in the WebUI's Lora folder are tested in test_lora_webui_file.py.
"""

import copy
import re

import pytest

from dreambooth_ext.train.lora import add_lora, lora_layers, lora_parameters, lora_state_dict, load_lora_state_dict
from tests.lora_models import assert_same, build, outputs, with_lora


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("preset", ["attention", "attention_ff", "attention_ff_conv"])
def test_add_lora_keeps_outputs_class_and_trains_only_lora(name, preset):
    _, unet, tes = build(name)
    before = outputs(unet, tes)
    classes = [type(m) for m in [unet] + tes]
    add_lora(unet, preset, 4, 4)
    for te in tes:
        add_lora(te, preset, 4, 4, is_text_encoder=True)
    assert [type(m) for m in [unet] + tes] == classes  # diffusers pipelines keep running them
    assert_same(outputs(unet, tes), before, atol=0)  # B starts at zero
    for m in [unet] + tes:
        trainable = {id(p) for p in m.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in lora_parameters(m)} and trainable

    paths = set(lora_layers(unet))
    attention = {p for p in paths if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", p)}
    n_blocks = len({p.rsplit(".attn", 1)[0] for p in attention})
    assert len(attention) == 8 * n_blocks  # q, k, v, out of attn1 and attn2 in every transformer block
    has_ff = any(p.endswith("ff.net.2") for p in paths) and any(p.endswith("proj_in") for p in paths)
    has_conv = any(p.endswith("conv1") for p in paths) and any("downsamplers" in p for p in paths) \
        and any("upsamplers" in p for p in paths) and any(p.endswith("time_emb_proj") for p in paths)
    assert (paths == attention) == (preset == "attention")
    assert has_ff == (preset != "attention") and has_conv == (preset == "attention_ff_conv")
    for te in tes:
        te_paths = lora_layers(te)
        assert len(te_paths) == 6 * te.config.num_hidden_layers
        assert all(re.search(r"(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])$", p) for p in te_paths)


def test_bad_preset_and_rank_are_refused():
    _, unet, _ = build("sd1")
    with pytest.raises(ValueError, match="preset"):
        add_lora(unet, "everything", 4, 4)
    with pytest.raises(ValueError, match="rank"):
        add_lora(unet, "attention", 0, 4)


def test_state_dict_restores_onto_plain_and_adapted_models():
    family, unet, tes, (base_unet, base_tes) = with_lora("sd2")
    want = outputs(unet, tes)
    states = [lora_state_dict(m) for m in [unet] + tes]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for s in states for k in s)
    plain = [copy.deepcopy(base_unet)] + copy.deepcopy(base_tes)
    for m, s in zip(plain, states):
        load_lora_state_dict(m, s)
    assert_same(outputs(plain[0], plain[1:]), want)

    adapted = [copy.deepcopy(base_unet)] + copy.deepcopy(base_tes)
    add_lora(adapted[0], "attention_ff_conv", 4, 2.0)
    for te in adapted[1:]:
        add_lora(te, "attention", 2, 4.0, is_text_encoder=True)
    for m, s in zip(adapted, states):
        load_lora_state_dict(m, s)
    assert_same(outputs(adapted[0], adapted[1:]), want)

