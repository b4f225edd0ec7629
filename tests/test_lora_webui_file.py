"""LoRA files for the WebUI: the names the WebUI's Lora extension resolves, the delta it adds, and the files
loading back into fresh models.

The key checks resolve every written layer name the way A1111 v1.10.1's Lora extension does, using its
transcription in the WebUI double (tests/webui_double/lora_networks.py, from extensions-builtin/Lora/networks.py
and network_lora.py), against the LDM module names the WebUI's models have, and then check that the delta the
WebUI would add there (up @ down * alpha / rank) is peft's delta of that layer.
"""

import copy
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.lora import add_lora, get_lora_weights, lora_layers, lora_parameters
from dreambooth_ext.train.lora_export import (
    apply_webui_lora,
    export_webui_lora,
    load_webui_lora,
    uses_diffusers_unet_names,
    webui_lora_tensors,
)
from tests.lora_models import assert_same, build, merge_lora_into, outputs, perturb, with_lora
from tests.webui_double.lora_networks import find_layer, flat, lora_updown, network_layer_names


@pytest.mark.parametrize("name", ["sd1", "sd1-released", "sd2", "sdxl", "sdxl-released"])
def test_exported_keys_resolve_in_a1111_to_the_right_layer_with_peft_delta(name, tmp_path):
    family, unet, tes, (base_unet, base_tes) = with_lora(name)
    path = export_webui_lora(unet, tes, tmp_path / "x.safetensors", family, {"ss_output_name": "x"}, dtype=torch.float32)
    sd = load_webui_lora(path)

    layer_names = {k.split(".", 1)[0] for k in sd}
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in sd)
    assert len(sd) == 3 * len(layer_names)
    # the naming form: kohya's diffusers names only where A1111's block arithmetic holds
    unet_names = [n for n in layer_names if n.startswith("lora_unet_")]
    diffusers_form = name == "sd1-released"
    assert uses_diffusers_unet_names(family, dict(unet.config)) == diffusers_form
    assert all(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) == diffusers_form
               for n in unet_names)
    te_prefixes = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    assert {n.split("_text_model")[0] + "_" for n in layer_names if not n.startswith("lora_unet_")} == set(te_prefixes)

    modules, targets = network_layer_names(family, base_unet, base_tes)
    is_sd2 = family.startswith("sd2")
    models = [unet] + tes
    resolved = {}
    for n in layer_names:
        hit = find_layer(n, modules, is_sd2)
        assert hit is not None, f"A1111 would not load {n}"
        sd_key, _ = hit
        resolved[sd_key] = targets[sd_key]
    expected = {(i, p) for i, m in enumerate(models) for p in lora_layers(m)}
    assert set(resolved.values()) == expected  # every adapter lands once, on its own layer

    # OpenCLIP attention: A1111 applies q/k/v only when q, k, v and out_proj of a layer are all there
    for mha in {k.rsplit("_", 2)[0] for k in resolved if re.search(r"_attn_[qkv]_proj$", k)}:
        assert {f"{mha}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= set(resolved)

    name_of = {find_layer(n, modules, is_sd2)[0]: n for n in layer_names}
    for sd_key, (i, p) in resolved.items():
        n = name_of[sd_key]
        layer = lora_layers(models[i])[p]
        down, up, alpha = sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], float(sd[f"{n}.alpha"])
        assert sd[f"{n}.alpha"].dim() == 0
        if isinstance(layer.get_base_layer(), torch.nn.Conv2d):
            k = layer.get_base_layer().kernel_size
            assert down.shape[2:] == k and up.shape[2:] == (1, 1)
        delta = lora_updown(down, up, alpha, layer.get_base_layer().weight.shape)
        torch.testing.assert_close(delta, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_v2"] == str(is_sd2) and meta["ss_output_name"] == "x"


@pytest.mark.parametrize("name", ["sd1", "sdxl-released"])
def test_diffusers_names_would_misplace_layers_of_other_layouts(name):
    """Why tiny and SDXL files use LDM names: A1111's arithmetic assumes SD1's layout."""
    family, unet, tes, (base_unet, base_tes) = with_lora(name)
    modules, targets = network_layer_names(family, base_unet, base_tes)
    wrong = set()
    for p in lora_layers(unet):
        hit = find_layer("lora_unet_" + flat(p), modules, False)
        if hit is None or targets[hit[0]] != (0, p):
            wrong.add(p)
    if name == "sdxl-released":
        assert wrong == {"up_blocks.0.upsamplers.0.conv"}  # lost: its conv sits in slot 2, after the attention
    else:
        # with one resnet per level, "3 input blocks per level" is off from level 1 on: up-path attention is lost
        assert {p for p in lora_layers(unet) if p.startswith("up_blocks.1.attentions")} <= wrong


@pytest.mark.parametrize("name", ["sd1", "sd1-released", "sd2", "sdxl"])
def test_file_loads_back_into_fresh_models_and_merges(name, tmp_path):
    family, unet, tes, (base_unet, base_tes) = with_lora(name)
    want = outputs(unet, tes)
    path = export_webui_lora(unet, tes, tmp_path / "x.safetensors", family, dtype=torch.float32)

    fresh_unet, fresh_tes = copy.deepcopy(base_unet), copy.deepcopy(base_tes)
    apply_webui_lora(fresh_unet, fresh_tes, load_webui_lora(path), family)
    assert_same(outputs(fresh_unet, fresh_tes), want)
    assert {p for p in lora_parameters(fresh_unet)} and all(
        p.requires_grad == any(p is q for q in lora_parameters(fresh_unet)) for p in fresh_unet.parameters())

    merge_lora_into(fresh_unet, fresh_tes)
    assert not lora_layers(fresh_unet) and not any(lora_layers(te) for te in fresh_tes)
    assert type(fresh_unet) is UNet2DConditionModel
    assert set(fresh_unet.state_dict()) == set(base_unet.state_dict())  # plain keys again, ready for the bridge
    assert_same(outputs(fresh_unet, fresh_tes), want)


def test_loading_into_existing_adapters_of_the_same_rank(tmp_path):
    family, unet, tes, (base_unet, base_tes) = with_lora("sdxl")
    want = outputs(unet, tes)
    path = export_webui_lora(unet, tes, tmp_path / "x.safetensors", family, dtype=torch.float32)
    fresh_unet, fresh_tes = copy.deepcopy(base_unet), copy.deepcopy(base_tes)
    add_lora(fresh_unet, "attention_ff_conv", 4, 1.0)  # alpha is taken from the file
    apply_webui_lora(fresh_unet, fresh_tes, load_webui_lora(path), family)
    assert_same(outputs(fresh_unet, fresh_tes), want)

    other_unet = copy.deepcopy(base_unet)
    add_lora(other_unet, "attention", 8, 8)
    with pytest.raises(UserError, match="rank"):
        apply_webui_lora(other_unet, copy.deepcopy(base_tes), load_webui_lora(path), family)


def test_mixed_ranks_round_trip(tmp_path):
    family, unet, tes = build("sd1")
    base = copy.deepcopy(unet)
    add_lora(unet, "attention", 4, 4)
    add_lora(unet, "attention_ff_conv", 2, 1)  # adds only the layers not yet adapted
    perturb([unet])
    ranks = {w.down.shape[0] for w in get_lora_weights(unet).values()}
    assert ranks == {2, 4}
    want = outputs(unet, [])
    path = export_webui_lora(unet, [], tmp_path / "m.safetensors", family, dtype=torch.float32)
    apply_webui_lora(base, [], load_webui_lora(path), family)
    assert_same(outputs(base, []), want)
    assert {k: w.alpha for k, w in get_lora_weights(base).items()} == {k: w.alpha for k, w in get_lora_weights(unet).items()}


def test_default_export_is_fp16_and_leaves_no_partial_file(tmp_path):
    family, unet, tes, _ = with_lora("sd1")
    out = tmp_path / "Lora" / "name_100.safetensors"
    export_webui_lora(unet, tes, out, family, {"ss_tag_frequency": {"sks": 5}})
    assert sorted(p.name for p in out.parent.iterdir()) == ["name_100.safetensors"]
    sd = load_webui_lora(out)
    assert {t.dtype for k, t in sd.items() if not k.endswith(".alpha")} == {torch.float16}
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_tag_frequency"] == '{"sks": 5}'
    ref = webui_lora_tensors(unet, tes, family)
    for k, t in ref.items():
        torch.testing.assert_close(sd[k].float(), t.float(), atol=1e-3, rtol=1e-3)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    family, unet, tes, _ = with_lora("sd1")

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(UserError, match="disk filled up while writing x.safetensors"):
        export_webui_lora(unet, tes, tmp_path / "x.safetensors", family)
    assert list(tmp_path.iterdir()) == []


def test_foreign_or_unsupported_files_are_refused(tmp_path):
    family, unet, tes, _ = with_lora("sdxl", preset="attention")
    sdxl_file = export_webui_lora(unet, tes, tmp_path / "xl.safetensors", family)
    _, sd1_unet, sd1_tes = build("sd1")
    with pytest.raises(UserError, match="another model type"):
        apply_webui_lora(sd1_unet, sd1_tes, load_webui_lora(sdxl_file), "sd1")

    sd = dict(load_webui_lora(sdxl_file))
    name = next(k for k in sd if k.endswith(".lora_down.weight")).split(".")[0]
    sd[f"{name}.hada_w1_a"] = torch.zeros(2, 2)
    _, xl_unet, xl_tes = build("sdxl")
    with pytest.raises(UserError, match="LyCORIS"):
        apply_webui_lora(xl_unet, xl_tes, sd, "sdxl")
    with pytest.raises(UserError, match="not found"):
        load_webui_lora(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="not a readable"):
        load_webui_lora(tmp_path / "bad.safetensors")
