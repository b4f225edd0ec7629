"""How the WebUI's built-in Lora extension finds the layer a LoRA file's key names, and what it adds there.

Written from reading AUTOMATIC1111 v1.10.1 (commit 82a973c0), extensions-builtin/Lora:
- networks.py `convert_diffusers_name_to_compvis`: kohya's diffusers-style UNet names and the text encoders'
  names become the WebUI's module names; a name no rule matches comes back unchanged.
- networks.py `load_network`: the lookup order (converted name; then without a trailing _q/_k/_v_proj, for
  OpenCLIP's fused attention; then `lora_unet` -> `diffusion_model`; then SDXL's `lora_te1_text_model`).
- networks.py `assign_network_names_to_compvis_modules`: a module's name is its path with '.' -> '_', under
  `diffusion_model_` for the UNet and the text encoder's own prefix.
- network_lora.py `NetworkModuleLora.calc_updown` with lyco_helpers.py `rebuild_conventional` and network.py
  `calc_scale`: the delta is up @ down (flattened), shaped like the weight, times alpha / rank.
Only what the extension's files use is modelled: LoRA (lora_up/lora_down/alpha) keys, multiplier 1.
"""

import re

import torch

from dreambooth_ext.bridge.keymap import SPLIT3
from dreambooth_ext.bridge.keymap_text import openclip_rows
from dreambooth_ext.bridge.keymap_unet import unet_rows

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


def convert_diffusers_name_to_compvis(name, is_sd2):
    """networks.convert_diffusers_name_to_compvis: unmatched names come back unchanged."""
    for rule, build in _UNET_RULES:
        m = re.match(rule, name)
        if m:
            return build(m.groups())
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        layer, rest = m.groups()
        if is_sd2:
            return f"model_transformer_resblocks_{layer}_{_openclip(rest)}"
        return f"transformer_text_model_encoder_layers_{layer}_{rest}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        return f"1_model_transformer_resblocks_{m.group(1)}_{_openclip(m.group(2))}"
    return name


def find_layer(name, modules, is_sd2):
    """networks.load_network's lookup order: (key the weights are filed under, layer found) or None."""
    key = convert_diffusers_name_to_compvis(name, is_sd2)
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


def flat(path):
    """networks.assign_network_names_to_compvis_modules: a module path as the WebUI names it."""
    return path.replace(".", "_")


def network_layer_names(family, base_unet, base_tes):
    """(the WebUI's layer names for these models, {key: (component, diffusers path)}).

    The WebUI names the modules of its LDM model; their LDM paths come from the bridge's single-file tables
    (component 0 is the UNet, i + 1 the i-th text encoder). OpenCLIP's attention is one MultiheadAttention
    whose q/k/v keys all land on it."""
    modules, targets = set(), {}

    def add(name, component, path):
        modules.add(name)
        targets[name] = (component, path)

    for row in unet_rows(dict(base_unet.config), list(base_unet.state_dict())):
        if row.single.endswith(".weight"):
            add("diffusion_model_" + flat(row.single[:-7]), 0, row.diffusers[0][:-7])
    openclip = {"sd2": "model_", "sd2-v": "model_", "sdxl": "1_model_"}.get(family)
    for i, te in enumerate(base_tes):
        if openclip and (family != "sdxl" or i == 1):
            for row in openclip_rows(te.config.num_hidden_layers, with_projection=False):
                if row.op == SPLIT3 and row.single.endswith("in_proj_weight"):
                    mha = openclip + flat(row.single[: -len(".in_proj_weight")])
                    modules.add(mha)
                    for proj, diffusers_key in zip(("q_proj", "k_proj", "v_proj"), row.diffusers):
                        targets[f"{mha}_{proj}"] = (i + 1, diffusers_key[:-7])
                elif row.single.endswith(".weight") and row.diffusers[0].startswith("text_model.encoder"):
                    add(openclip + flat(row.single[:-7]), i + 1, row.diffusers[0][:-7])
        else:
            head = "0_transformer_" if family == "sdxl" else "transformer_"
            for path, m in te.named_modules():
                if isinstance(m, torch.nn.Linear):
                    add(head + flat(path), i + 1, path)
    return modules, targets


def lora_updown(down, up, alpha, weight_shape):
    """network_lora.calc_updown at multiplier 1: up @ down (flattened) in the weight's shape, times alpha / rank."""
    return (up.flatten(1) @ down.flatten(1)).reshape(weight_shape) * (float(alpha) / down.shape[0])
