"""LoRA files the WebUI's built-in Lora extension loads, and back.

How A1111 v1.10.1 (`extensions-builtin/Lora`) finds a layer for a key:
- `networks.load_network` splits each key at its first "." into a layer name and a part
  (`lora_down.weight`, `lora_up.weight`, `alpha`), then looks the layer name up in
  `network_layer_mapping`, which `assign_network_names_to_compvis_modules` fills with the
  LDM module names, dots as underscores: `diffusion_model_input_blocks_1_1_...` (UNet),
  `transformer_text_model_...` (SD1 CLIP), `model_transformer_resblocks_...` (SD2 OpenCLIP),
  `0_transformer_text_model_...` / `1_model_transformer_resblocks_...` (SDXL's two encoders).
- The name is tried in this order: (1) through `convert_diffusers_name_to_compvis`;
  (2) with a trailing `_q_proj/_k_proj/_v_proj` cut off (OpenCLIP's fused MultiheadAttention);
  (3) `lora_unet` replaced by `diffusion_model` (LDM names as they are); (4) `lora_te1_text_model`
  replaced by `0_transformer_text_model`, then by `transformer_text_model`.
- `convert_diffusers_name_to_compvis` maps diffusers UNet names with fixed arithmetic: input
  block 1 + 3*level + index, output block 3*level + index, downsampler `input_blocks.{3+3*level}.0.op`,
  upsampler `output_blocks.{2+3*level}.{2 if level else 1}.conv`, resnet conv1/conv2/
  time_emb_proj/conv_shortcut -> in_layers.2/out_layers.3/emb_layers.1/skip_connection. That is
  right only for the released SD1/SD2 layout (four levels of two resnets, no attention in up
  level 0); for SDXL the up_blocks.0 upsampler lands on the wrong layer.
  Text: `lora_te_text_model_encoder_layers_N_*` -> SD1 `transformer_text_model_...`, or on SD2
  `model_transformer_resblocks_N_*` with mlp_fc1 -> mlp_c_fc, mlp_fc2 -> mlp_c_proj, self_attn -> attn;
  `lora_te2_...` the same under `1_` for SDXL's second encoder.
- `networks.network_apply_weights` applies q/k/v LoRAs to an OpenCLIP MultiheadAttention only
  when q_proj, k_proj, v_proj and out_proj of that layer are all in the file.
- `network_lora.NetworkModuleLora`: down is a Linear, or for a Conv2d layer a conv with the
  layer's kernel, stride and padding; up is a Linear or 1x1 conv. `network.NetworkModule.calc_scale`
  scales by alpha / rank (rank = lora_down.shape[0]), 1 without alpha.
- `network.NetworkOnDisk.detect_version` reads the metadata: `ss_base_model_version` starting
  with `sdxl_` -> SDXL, `ss_v2 == "True"` -> SD2, else SD1; the Lora tab hides other families.

What this module writes (kohya sd-scripts' format, the de-facto standard):
- UNet of the released SD1/SD2 layout: diffusers names (`lora_unet_down_blocks_0_attentions_0_
  transformer_blocks_0_attn1_to_q`), mapped by rule (1). SDXL and any other layout (the tiny
  test models): LDM names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
  mapped by rule (3), which holds for every layout.
- Text: `lora_te_` (SD1, SD2) or `lora_te1_`/`lora_te2_` (SDXL) + the transformers CLIP path.
  Every q/k/v/out_proj is always written, so SD2 and SDXL's OpenCLIP encoders take them.
- `<name>.lora_down.weight`, `<name>.lora_up.weight` (4D for convolutions: down [r, in, k, k],
  up [out, r, 1, 1]) and `<name>.alpha` (0-dim float32).

Unsupported: LoRA on embeddings, layer norms, text_projection, conv_in/conv_out or the time
embedding (no preset targets them); reading LyCORIS types (every kind of lora_kinds.py but LoRA), DoRA
(`dora_scale`), CP-decomposed convs (`lora_mid`), per-layer `scale`, bundled embeddings and
peft/diffusers-format files (`lora_A`/`lora_B` keys).
"""

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from dreambooth_ext.bridge.family_data import FAMILY_NAMES, load_family
from dreambooth_ext.bridge.keymap_unet import RESNET_RENAMES, unet_module_map
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.lora import LoraWeights, adaptable_modules, get_lora_weights, set_lora_weights
from dreambooth_ext.train.lora_kinds import LORA, kind_of, refused_labels

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te"  # then _ (SD1, SD2) or 1_ / 2_ (SDXL's two)
# family -> (ss_base_model_version, ss_v2), the values kohya writes and A1111's detect_version reads
BASE_VERSIONS = {"sd1": ("sd_v1", False), "sd2": ("sd_v2", True), "sd2-v": ("sd_v2", True), "sdxl": ("sdxl_base_v1-0", False)}
# layout fields A1111's diffusers-name arithmetic takes for granted
_LAYOUT_FIELDS = ("down_block_types", "up_block_types", "layers_per_block")


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _check_family(family: str, text_encoders: Sequence[nn.Module]) -> None:
    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown model family {family!r}; valid names: {', '.join(FAMILY_NAMES)}")
    allowed = (0, 2) if family == "sdxl" else (0, 1)
    if len(text_encoders) not in allowed:
        raise ValueError(f"a {family} model has {allowed[-1]} text encoder(s), got {len(text_encoders)}")


def text_encoder_prefixes(family: str) -> List[str]:
    return [f"{TEXT_ENCODER_PREFIX}1_", f"{TEXT_ENCODER_PREFIX}2_"] if family == "sdxl" else [f"{TEXT_ENCODER_PREFIX}_"]


def is_text_encoder_key(key: str) -> bool:
    """A WebUI LoRA key of a text encoder's layer (any family's spelling)."""
    return key.startswith(TEXT_ENCODER_PREFIX)


def _layout(config: Mapping, field: str):
    value = config[field]
    levels = len(config["down_block_types"])
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def uses_diffusers_unet_names(family: str, config: Mapping) -> bool:
    """True where A1111's fixed diffusers-name arithmetic lands every layer right: released SD1/SD2 layouts."""
    if family == "sdxl":
        return False
    released = load_family(family)["unet"]
    return all(_layout(config, f) == _layout(released, f) for f in _LAYOUT_FIELDS)


def ldm_module_path(module_map: Mapping[str, str], path: str) -> str:
    """diffusers UNet module path -> LDM module path (`down_blocks.0.resnets.0.conv1` -> `input_blocks.1.0.in_layers.2`)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in module_map:
            rest = parts[i:]
            if rest and re.search(r"(^|\.)resnets\.\d+$", head):
                rest[0] = RESNET_RENAMES.get(rest[0], rest[0])
            return ".".join([module_map[head]] + rest)
    raise KeyError(f"no LDM counterpart for UNet module {path}")


def unet_write_names(unet: nn.Module, family: str, paths: Sequence[str]) -> Dict[str, str]:
    """UNet module path -> the WebUI layer name this module writes for it."""
    config = dict(unet.config)
    if uses_diffusers_unet_names(family, config):
        return {p: UNET_PREFIX + _flat(p) for p in paths}
    module_map = unet_module_map(config)
    return {p: UNET_PREFIX + _flat(ldm_module_path(module_map, p)) for p in paths}


def _read_names(unet: nn.Module, text_encoders: Sequence[nn.Module], family: str) -> Dict[str, Tuple[int, str]]:
    """WebUI layer name -> (component index, module path); both UNet naming forms, 0 is the UNet."""
    names: Dict[str, Tuple[int, str]] = {}
    module_map = unet_module_map(dict(unet.config))
    for path in adaptable_modules(unet):
        names[UNET_PREFIX + _flat(path)] = (0, path)
        try:
            names[UNET_PREFIX + _flat(ldm_module_path(module_map, path))] = (0, path)
        except KeyError:
            pass
    prefixes = text_encoder_prefixes(family)
    if family != "sdxl":
        prefixes = prefixes + [f"{TEXT_ENCODER_PREFIX}1_"]  # some SD1 files use te1 (A1111 rule 4 accepts them)
    for i, te in enumerate(text_encoders):
        for prefix in (prefixes if family != "sdxl" else [prefixes[i]]):
            for path in adaptable_modules(te):
                names[prefix + _flat(path)] = (i + 1, path)
    return names


def webui_lora_tensors(
    unet: nn.Module, text_encoders: Sequence[nn.Module], family: str, dtype: Optional[torch.dtype] = None
) -> Dict[str, torch.Tensor]:
    """The adapters of peft-injected models as WebUI LoRA tensors (`dtype` None keeps the trained dtype)."""
    _check_family(family, text_encoders)
    named: List[Tuple[str, LoraWeights]] = []
    unet_weights = get_lora_weights(unet)
    for path, name in unet_write_names(unet, family, list(unet_weights)).items():
        named.append((name, unet_weights[path]))
    for prefix, te in zip(text_encoder_prefixes(family), text_encoders):
        named += [(prefix + _flat(p), w) for p, w in get_lora_weights(te).items()]
    if not named:
        raise ValueError("the models carry no LoRA adapters to export")
    out = {}
    for name, w in named:
        out[f"{name}.lora_down.weight"] = w.down.to("cpu", dtype or w.down.dtype).contiguous()
        out[f"{name}.lora_up.weight"] = w.up.to("cpu", dtype or w.up.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
    return out


def _most_common(values: List) -> object:
    return max(set(values), key=values.count)


def lora_metadata(tensors: Mapping[str, torch.Tensor], family: str, metadata: Optional[Mapping] = None) -> Dict[str, str]:
    """safetensors metadata: the caller's entries (non-strings as JSON), then kohya's `ss_*` network fields."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    ranks = [int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")]
    alphas = [float(t) for k, t in tensors.items() if k.endswith(".alpha")]
    version, v2 = BASE_VERSIONS[family]
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common(ranks)),
        "ss_network_alpha": str(_most_common(alphas)),
        "ss_base_model_version": version,
        "ss_v2": str(v2),
    })
    if family == "sd2-v":
        meta["ss_v_parameterization"] = "True"
    return meta


def _write_atomic(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """The bridge's writer: a temporary sibling renamed into place; a full disk is one sentence."""
    from safetensors.torch import save_file

    from dreambooth_ext.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def export_webui_lora(
    unet: nn.Module,
    text_encoders: Sequence[nn.Module],
    path,
    family: str,
    metadata: Optional[Mapping] = None,
    dtype: Optional[torch.dtype] = torch.float16,
) -> Path:
    """Write the adapters of peft-injected models as a WebUI LoRA `.safetensors` (atomically); returns the path.

    `text_encoders`: [] or the family's encoders in order (SDXL: both, adapted or not).
    `dtype`: the stored dtype of down/up weights (fp16 like most LoRA files; None keeps the trained one).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a LoRA file is written as .safetensors, got {path.name}")
    tensors = webui_lora_tensors(unet, text_encoders, family, dtype)
    _write_atomic(tensors, path, lora_metadata(tensors, family, metadata))
    return path


def load_webui_lora(path) -> Dict[str, torch.Tensor]:
    """The tensors of a WebUI LoRA file (.safetensors; .pt/.ckpt read with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}. Check the path or pick a file from the models/Lora folder.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable LoRA file ({e}). Re-download or re-export it.") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a LoRA state dict. Pick a LoRA .safetensors file.")
    return sd


def _group(lora_sd: Mapping[str, torch.Tensor]) -> Dict[str, LoraWeights]:
    """The file's layers (keys split at their first "."), each read as its network kind (lora_kinds.py)."""
    parts: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in lora_sd.items():
        name, _, part = key.partition(".")
        parts[name][part] = tensor
    return {name: _layer_weights(name, p) for name, p in parts.items()}


def _layer_weights(name: str, p: Dict[str, torch.Tensor]) -> LoraWeights:
    kind = kind_of(p)
    if kind is None and set(p) <= set(LORA.parts):
        raise UserError(f"LoRA layer {name} lacks its lora_down or lora_up weight: the file is incomplete.")
    if kind is not None and not kind.trainable:
        raise UserError(f"LoRA layer {name} is a {kind.label} layer ({', '.join(sorted(p))}): only plain LoRA "
                        f"(lora_down/lora_up/alpha) files can be trained on; LyCORIS types ({refused_labels()}) "
                        "cannot.")
    extra = (kind or LORA).extra(p)
    if extra:
        raise UserError(
            f"LoRA layer {name} has {', '.join(extra)}: only plain LoRA (lora_down/lora_up/alpha) files "
            "can be trained on; LyCORIS, DoRA and other network types cannot."
        )
    down = p["lora_down.weight"]
    alpha = float(p["alpha"]) if "alpha" in p else float(down.shape[0])  # A1111: no alpha -> scale 1
    return LoraWeights(down, p["lora_up.weight"], alpha)


def apply_webui_lora(
    unet: nn.Module, text_encoders: Sequence[nn.Module], lora_sd: Mapping[str, torch.Tensor], family: str
) -> None:
    """Load a WebUI LoRA (ours or kohya's) into peft adapters of these models, in place, to train on from it.

    Layers without an adapter get one of the file's rank and alpha; layers with one keep it and take
    the file's weights (ranks must agree). Everything but the adapters ends frozen.
    """
    _check_family(family, text_encoders)
    models = [unet] + list(text_encoders)
    names = _read_names(unet, text_encoders, family)
    per_model: Dict[int, Dict[str, LoraWeights]] = defaultdict(dict)
    unknown = []
    for name, w in _group(lora_sd).items():
        if name in names:
            index, path = names[name]
            per_model[index][path] = w
        else:
            unknown.append(name)
    if unknown:
        raise UserError(
            f"{len(unknown)} layers of the LoRA (e.g. {sorted(unknown)[0]}) name nothing in this {family} model: "
            "it was made for another model type. Pick a LoRA trained on the same base family."
        )
    for index, weights in per_model.items():
        try:
            set_lora_weights(models[index], weights)
        except ValueError as e:  # a rank or shape that does not fit: a user's choice of file or settings
            raise UserError(f"This LoRA does not fit the model being trained: {e}. Use the rank of the earlier LoRA.") from e
