"""LoRA adapters (peft) on the UNet and the text encoders.

Adapters are injected in place with `peft.inject_adapter_in_model`, so a UNet stays a
`UNet2DConditionModel` and a text encoder a `CLIPTextModel`: diffusers pipelines run them
unchanged. Works with peft 0.12 (A1111 host) and 0.13 (Forge).

Each adapted layer is addressed by its module path in the diffusers/transformers model
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`). `lora_export` turns those
paths into the WebUI's key names.
"""

import re
from collections import defaultdict
from typing import Dict, Iterator, List, Mapping, NamedTuple, Sequence, Tuple

import torch
from torch import nn

ADAPTER = "default"

# Targets as module-path patterns (matched against the end of a path). Tables, not branches.
ATTENTION = (r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",)
FEED_FORWARD = (r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)", r"attentions\.\d+\.(proj_in|proj_out)")
CONVOLUTIONS = (r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)", r"(downsamplers|upsamplers)\.0\.conv")
TEXT_ENCODER = (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"mlp\.(fc1|fc2)")

UNET_PRESETS: Dict[str, Tuple[str, ...]] = {
    "attention": ATTENTION,
    "attention_ff": ATTENTION + FEED_FORWARD,
    "attention_ff_conv": ATTENTION + FEED_FORWARD + CONVOLUTIONS,
}
PRESET_NAMES = tuple(UNET_PRESETS)


class LoraWeights(NamedTuple):
    """One adapted layer: down [r, in(, k, k)], up [out, r(, 1, 1)], alpha; delta = up @ down * alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def _lora_layer_type():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _patterns(preset: str, is_text_encoder: bool) -> Tuple[str, ...]:
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown LoRA target preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    # The text encoder has a single set of targets, whatever the UNet preset.
    return TEXT_ENCODER if is_text_encoder else UNET_PRESETS[preset]


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Module path -> peft LoRA layer, for every adapted layer of `model`."""
    layer_type = _lora_layer_type()
    return {name: m for name, m in model.named_modules() if isinstance(m, layer_type) and ADAPTER in m.lora_A}


def adaptable_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Module path -> Linear/Conv2d layer that can carry a LoRA (adapted or not), base layers only."""
    wrapped = lora_layers(model)
    out = dict(wrapped)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parts = name.split(".")
        # skip peft's own pieces: `<path>.base_layer` and `<path>.lora_A.default`
        if ".".join(parts[:-1]) in wrapped or ".".join(parts[:-2]) in wrapped:
            continue
        out[name] = module
    return out


def target_module_names(model: nn.Module, preset: str, is_text_encoder: bool = False) -> List[str]:
    """Paths of the not-yet-adapted Linear/Conv2d layers a preset selects."""
    rule = re.compile(r"(?:.*\.)?(?:" + "|".join(_patterns(preset, is_text_encoder)) + ")")
    wrapped = lora_layers(model)
    return sorted(
        name for name, module in adaptable_modules(model).items()
        if name not in wrapped and rule.fullmatch(name)
    )


def _inject(model: nn.Module, names: Sequence[str], rank: int, alpha: float) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # B = 0: the model's output is unchanged until the first step
        target_modules=list(names),  # full paths: peft matches them exactly
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def _train_only_lora(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def add_lora(model: nn.Module, preset: str, rank: int, alpha: float, is_text_encoder: bool = False) -> nn.Module:
    """Inject LoRA adapters (rank, alpha) into the preset's layers, in place; freeze everything else.

    UNet presets: "attention" (to_q/to_k/to_v/to_out.0 of attn1 and attn2), "attention_ff"
    (plus ff.net.0.proj, ff.net.2 and the transformers' proj_in/proj_out), "attention_ff_conv"
    (plus resnet conv1/conv2/conv_shortcut/time_emb_proj and the down/upsampler convs).
    With `is_text_encoder` the layers are q/k/v/out_proj and fc1/fc2 of every encoder layer
    (`preset` must still be a valid name). Returns the same model object.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    names = target_module_names(model, preset, is_text_encoder)
    if not names:
        raise ValueError(f"LoRA preset {preset!r} selects no layer of {type(model).__name__} that has no adapter yet")
    _inject(model, names, rank, alpha)
    _train_only_lora(model)
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The LoRA down/up weights of `model`, in a stable order (what the optimizer trains)."""
    for _, layer in sorted(lora_layers(model).items()):
        yield layer.lora_A[ADAPTER].weight
        yield layer.lora_B[ADAPTER].weight


def cast_lora_parameters(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Keep trained weights in `dtype` (fp32) while the base runs in fp16/bf16; peft casts at the seam."""
    for p in lora_parameters(model):
        p.data = p.data.to(dtype)


def get_lora_weights(model: nn.Module) -> Dict[str, LoraWeights]:
    """Module path -> (down, up, alpha) of every adapted layer, detached."""
    out = {}
    for name, layer in sorted(lora_layers(model).items()):
        out[name] = LoraWeights(
            layer.lora_A[ADAPTER].weight.detach(),
            layer.lora_B[ADAPTER].weight.detach(),
            float(layer.lora_alpha[ADAPTER]),
        )
    return out


def lora_delta(weights: LoraWeights) -> torch.Tensor:
    """The weight change a LoRA layer stands for, shaped like the base weight it adds to."""
    down, up = weights.down.float(), weights.up.float()
    rank = down.shape[0]
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return delta.reshape((up.shape[0],) + tuple(down.shape[1:])) * (weights.alpha / rank)


def _check_shape(path: str, which: str, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if tensor.shape == param.shape:
        return tensor
    if tensor.numel() == param.numel():  # 2D vs [.., 1, 1] for 1x1 convs
        return tensor.reshape(param.shape)
    raise ValueError(f"LoRA {which} weight for {path} has shape {tuple(tensor.shape)}, the layer needs {tuple(param.shape)}")


def set_lora_weights(model: nn.Module, weights: Mapping[str, LoraWeights]) -> None:
    """Put these LoRA weights into `model`, adding adapters (of the given rank and alpha) where none is yet.

    A layer that already has an adapter must have the same rank; its alpha is taken from `weights`.
    """
    modules = adaptable_modules(model)
    unknown = sorted(set(weights) - set(modules))
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA layers name no Linear/Conv2d layer of {type(model).__name__}, e.g. {unknown[0]}")
    existing = lora_layers(model)
    groups: Dict[Tuple[int, float], List[str]] = defaultdict(list)
    for path, w in weights.items():
        rank = int(w.down.shape[0])
        if path in existing:
            if existing[path].r[ADAPTER] != rank:
                raise ValueError(f"LoRA for {path} has rank {rank} but the model's adapter has rank {existing[path].r[ADAPTER]}")
        else:
            groups[(rank, float(w.alpha))].append(path)
    # peft's per-layer rank/alpha patterns do not match top-level paths in every version: one injection per group
    for (rank, alpha), names in groups.items():
        _inject(model, names, rank, alpha)
    layers = lora_layers(model)
    with torch.no_grad():
        for path, w in weights.items():
            layer = layers[path]
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            down.copy_(_check_shape(path, "down", w.down, down))
            up.copy_(_check_shape(path, "up", w.up, up))
            layer.lora_alpha[ADAPTER] = w.alpha
            layer.scaling[ADAPTER] = w.alpha / layer.r[ADAPTER]
    _train_only_lora(model)


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters as tensors, for training state: `<path>.lora_A.weight`, `.lora_B.weight`, `.alpha`.

    Self-contained: `load_lora_state_dict` restores it onto a model without adapters too.
    """
    sd = {}
    for path, w in get_lora_weights(model).items():
        sd[f"{path}.lora_A.weight"] = w.down.clone()
        sd[f"{path}.lora_B.weight"] = w.up.clone()
        sd[f"{path}.alpha"] = torch.tensor(w.alpha)
    return sd


def load_lora_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `lora_state_dict` (adds missing adapters; every adapted layer must be in `sd`)."""
    parts: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if key.endswith(suffix):
                parts[key[: -len(suffix)]][suffix] = tensor
                break
        else:
            raise ValueError(f"not a LoRA state key: {key}")
    weights = {}
    for path, p in parts.items():
        if len(p) != 3:
            raise ValueError(f"LoRA state for {path} is incomplete: has {sorted(p)}")
        weights[path] = LoraWeights(p[".lora_A.weight"], p[".lora_B.weight"], float(p[".alpha"]))
    missing = sorted(set(lora_layers(model)) - set(weights))
    if missing:
        raise ValueError(f"LoRA state lacks {len(missing)} adapted layers of the model, e.g. {missing[0]}")
    set_lora_weights(model, weights)
