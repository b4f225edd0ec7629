"""Which components a family has, where each lives in both layouts, and its key table."""

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Tuple

import torch

from dreambooth_ext.bridge.keymap import Row, prefixed
from dreambooth_ext.bridge.keymap_text import clip_rows, openclip_rows
from dreambooth_ext.bridge.keymap_unet import unet_rows
from dreambooth_ext.bridge.keymap_vae import vae_rows

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."  # EMA copies in training checkpoints: kept aside, never trained
LEGACY_CLIP_PREFIX = "cond_stage_model.transformer."  # SD1's text encoder; older files lack `text_model.`
VAE_PREFIX = "first_stage_model."
# (single-file prefix, layout) of each text encoder, in diffusers order (text_encoder, text_encoder_2)
TEXT_ENCODER_LAYOUTS = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "openclip")],
}


TEXT_ENCODER = "text_encoder"  # diffusers' name of the (first) text encoder; also the key of all of them


def encoder_suffix(i: int) -> str:
    """How diffusers tells the i-th text encoder and tokenizer apart: '', '_2'."""
    return "" if i == 0 else f"_{i + 1}"


def text_encoder_name(i: int) -> str:
    """The diffusers name (subfolder, pipeline attribute) of the i-th text encoder: text_encoder, text_encoder_2."""
    return TEXT_ENCODER + encoder_suffix(i)


def base_family(family: str) -> str:
    """sd2-v shares sd2's weights layout; only the prediction type differs."""
    return "sd2" if family.startswith("sd2") else family


@dataclass
class Component:
    name: str  # diffusers subfolder: unet, vae, text_encoder, text_encoder_2
    single_prefix: str
    weights_file: str  # file name inside the subfolder
    shapes: Dict[str, Tuple[int, ...]]  # the diffusers model's own key -> shape
    rows: List[Row]  # single-file side carries the prefix; diffusers side does not


def _json_key(config: dict) -> str:
    import json

    return json.dumps(config, sort_keys=True)


@lru_cache(maxsize=32)
def _meta_shapes(kind: str, config_json: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    """Key -> shape of a model built on the meta device: no memory, no weights."""
    import json

    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**_public(config))
        elif kind == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**_public(config))
        else:
            import transformers

            cls = getattr(transformers, kind)
            model = cls(transformers.CLIPTextConfig(**_public(config)))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def meta_shapes(kind: str, config: dict) -> Dict[str, Tuple[int, ...]]:
    return dict(_meta_shapes(kind, _json_key(config)))


def components_for(family: dict) -> List[Component]:
    """The components of a family dict (shipped JSON shape), each with its key table."""
    base = base_family(family["family"])
    unet_shapes = meta_shapes("unet", family["unet"])
    vae_shapes = meta_shapes("vae", family["vae"])
    comps = [
        Component("unet", UNET_PREFIX, "diffusion_pytorch_model.safetensors", unet_shapes,
                  prefixed(unet_rows(family["unet"], list(unet_shapes)), UNET_PREFIX, "")),
        Component("vae", VAE_PREFIX, "diffusion_pytorch_model.safetensors", vae_shapes,
                  prefixed(vae_rows(family["vae"], list(vae_shapes)), VAE_PREFIX, "")),
    ]
    layouts = TEXT_ENCODER_LAYOUTS[base]
    if len(layouts) != len(family["text_encoders"]):
        raise ValueError(f"{base} needs {len(layouts)} text encoder(s), config has {len(family['text_encoders'])}")
    for i, ((prefix, layout), te) in enumerate(zip(layouts, family["text_encoders"])):
        shapes = meta_shapes(te["class"], te["config"])
        if layout == "clip":
            rows = clip_rows(list(shapes))
        else:
            rows = openclip_rows(te["config"]["num_hidden_layers"], te["class"] == "CLIPTextModelWithProjection")
        comps.append(Component(text_encoder_name(i), prefix, "model.safetensors", shapes, prefixed(rows, prefix, "")))
    return comps
