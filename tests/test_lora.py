"""LoRA: peft adapters on tiny models, and the WebUI LoRA files they become.

The key checks resolve every written layer name the way A1111 v1.10.1's
`extensions-builtin/Lora/networks.py` does (`load_network` with
`convert_diffusers_name_to_compvis`), written out below from reading that file, against the
LDM module names the WebUI's models have (taken from the bridge's key tables), and then check
that the delta A1111 would add there (up @ down * alpha / rank) is peft's delta of that layer.
"""

import copy
import re

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from dreambooth_ext.bridge.family_data import load_family
from dreambooth_ext.bridge.keymap import SPLIT3
from dreambooth_ext.bridge.keymap_text import openclip_rows
from dreambooth_ext.bridge.keymap_unet import unet_rows
from dreambooth_ext.errors import UserError
from dreambooth_ext.tiny import tiny_family
from dreambooth_ext.train.lora import (
    add_lora,
    get_lora_weights,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    load_lora_state_dict,
)
from dreambooth_ext.train.lora_export import (
    apply_webui_lora,
    export_webui_lora,
    load_webui_lora,
    merge_lora_into,
    uses_diffusers_unet_names,
    webui_lora_tensors,
)

# --- A1111's name resolution, as read in networks.py (v1.10.1) ---------------------------------

_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _inner(kind, rest):
    return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest


def _openclip(rest):
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


_UNET_RULES = [
    (r"lora_unet_conv_in(.*)", lambda g: f"diffusion_model_input_blocks_0_0{g[0]}"),
    (r"lora_unet_conv_out(.*)", lambda g: f"diffusion_model_out_2{g[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda g: f"diffusion_model_time_embed_{int(g[0]) * 2 - 2}{g[1]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_input_blocks_{1 + 3 * int(g[0]) + int(g[2])}_{int(g[1] == 'attentions')}_{_inner(g[1], g[3])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else 2 * int(g[1])}_{_inner(g[0], g[2])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_output_blocks_{3 * int(g[0]) + int(g[2])}_{int(g[1] == 'attentions')}_{_inner(g[1], g[3])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda g: f"diffusion_model_input_blocks_{3 + 3 * int(g[0])}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda g: f"diffusion_model_output_blocks_{2 + 3 * int(g[0])}_{2 if int(g[0]) > 0 else 1}_conv"),
]


def a1111_convert(name, is_sd2):
    """networks.convert_diffusers_name_to_compvis: unmatched names come back unchanged."""
    for rule, build in _UNET_RULES:
        m = re.match(rule, name)
        if m:
            return build(m.groups())
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        layer, rest = m.groups()
        return f"model_transformer_resblocks_{layer}_{_openclip(rest)}" if is_sd2 else f"transformer_text_model_encoder_layers_{layer}_{rest}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        return f"1_model_transformer_resblocks_{m.group(1)}_{_openclip(m.group(2))}"
    return name


def a1111_resolve(name, modules, is_sd2):
    """networks.load_network's lookup order: (sd_key the weights are filed under, layer found) or None."""
    key = a1111_convert(name, is_sd2)
    if key in modules:
        return key, key
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m.group(1) in modules:
        return key, m.group(1)
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        return (key, key) if key in modules else None
    if "lora_te1_text_model" in name:
        for head in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", head)
            if key in modules:
                return key, key
    return None


# --- The WebUI's layer names of a model, from the bridge's single-file tables --------------------

def _flat(path):
    return path.replace(".", "_")


def webui_layers(family, base_unet, base_tes):
    """(A1111 layer names, {sd_key: (component, diffusers path)}) for these models loaded in the WebUI."""
    modules, targets = set(), {}

    def add(name, component, path):
        modules.add(name)
        targets[name] = (component, path)

    for row in unet_rows(dict(base_unet.config), list(base_unet.state_dict())):
        if row.single.endswith(".weight"):
            add("diffusion_model_" + _flat(row.single[:-7]), 0, row.diffusers[0][:-7])
    openclip = {"sd2": "model_", "sd2-v": "model_", "sdxl": "1_model_"}.get(family)
    for i, te in enumerate(base_tes):
        if openclip and (family != "sdxl" or i == 1):
            for row in openclip_rows(te.config.num_hidden_layers, with_projection=False):
                if row.op == SPLIT3 and row.single.endswith("in_proj_weight"):  # one MultiheadAttention
                    mha = openclip + _flat(row.single[: -len(".in_proj_weight")])
                    modules.add(mha)
                    for proj, diffusers_key in zip(("q_proj", "k_proj", "v_proj"), row.diffusers):
                        targets[f"{mha}_{proj}"] = (i + 1, diffusers_key[:-7])
                elif row.single.endswith(".weight") and row.diffusers[0].startswith("text_model.encoder"):
                    add(openclip + _flat(row.single[:-7]), i + 1, row.diffusers[0][:-7])
        else:
            head = "0_transformer_" if family == "sdxl" else "transformer_"
            for path, m in te.named_modules():
                if isinstance(m, torch.nn.Linear):
                    add(head + _flat(path), i + 1, path)
    return modules, targets


# --- Tiny models ----------------------------------------------------------------------------------

def released_layout_sd1():
    """SD1's real block layout (4 levels, 2 resnets each) at a tiny width."""
    fam = tiny_family("sd1")
    real = load_family("sd1")["unet"]
    fam["unet"].update({k: real[k] for k in ("down_block_types", "up_block_types", "layers_per_block")})
    fam["unet"]["block_out_channels"] = [32, 32, 64, 64]
    return fam


def released_layout_sdxl():
    """SDXL's real block layout (3 levels, 2 resnets each, attention in up level 0) at a tiny width."""
    fam = tiny_family("sdxl")
    real = load_family("sdxl")["unet"]
    fam["unet"].update({k: real[k] for k in ("down_block_types", "up_block_types", "layers_per_block")})
    fam["unet"].update({"block_out_channels": [32, 64, 64], "attention_head_dim": 2, "transformer_layers_per_block": 1})
    return fam


def family_dict(name):
    variants = {"sd1-released": released_layout_sd1, "sdxl-released": released_layout_sdxl}
    return variants[name]() if name in variants else tiny_family(name)


def build(name, seed=0):
    fam = family_dict(name)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**fam["unet"]).eval()
    tes = [getattr(transformers, te["class"])(transformers.CLIPTextConfig(**te["config"])).eval()
           for te in fam["text_encoders"]]
    return fam["family"], unet, tes


def inputs(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = {
        "sample": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 7, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        x["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return x


@torch.no_grad()
def outputs(unet, tes):
    ids = torch.tensor([[0, 5, 17, 300, 999, 2, 1]])
    return [unet(**inputs(unet)).sample] + [te(input_ids=ids).last_hidden_state for te in tes]


def assert_same(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def perturb(models, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in models:
            for p in lora_parameters(m):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def with_lora(name, preset="attention_ff_conv", rank=4, alpha=2.0, te_rank=2, te_alpha=4.0):
    family, unet, tes = build(name)
    base = (copy.deepcopy(unet), copy.deepcopy(tes))
    add_lora(unet, preset, rank, alpha)
    for te in tes:
        add_lora(te, preset, te_rank, te_alpha, is_text_encoder=True)
    perturb([unet] + tes)
    return family, unet, tes, base


# --- Tests ----------------------------------------------------------------------------------------

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

    modules, targets = webui_layers(family, base_unet, base_tes)
    is_sd2 = family.startswith("sd2")
    models = [unet] + tes
    resolved = {}
    for n in layer_names:
        hit = a1111_resolve(n, modules, is_sd2)
        assert hit is not None, f"A1111 would not load {n}"
        sd_key, _ = hit
        resolved[sd_key] = targets[sd_key]
    expected = {(i, p) for i, m in enumerate(models) for p in lora_layers(m)}
    assert set(resolved.values()) == expected  # every adapter lands once, on its own layer

    # OpenCLIP attention: A1111 applies q/k/v only when q, k, v and out_proj of a layer are all there
    for mha in {k.rsplit("_", 2)[0] for k in resolved if re.search(r"_attn_[qkv]_proj$", k)}:
        assert {f"{mha}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= set(resolved)

    name_of = {a1111_resolve(n, modules, is_sd2)[0]: n for n in layer_names}
    for sd_key, (i, p) in resolved.items():
        n = name_of[sd_key]
        layer = lora_layers(models[i])[p]
        down, up, alpha = sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], float(sd[f"{n}.alpha"])
        assert sd[f"{n}.alpha"].dim() == 0
        if isinstance(layer.get_base_layer(), torch.nn.Conv2d):
            k = layer.get_base_layer().kernel_size
            assert down.shape[2:] == k and up.shape[2:] == (1, 1)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.get_base_layer().weight.shape) * alpha / down.shape[0]
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
    modules, targets = webui_layers(family, base_unet, base_tes)
    wrong = set()
    for p in lora_layers(unet):
        hit = a1111_resolve("lora_unet_" + _flat(p), modules, False)
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
