"""Tell a checkpoint's family from its keys and shapes alone, or refuse it in one sentence."""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

Shapes = Dict[str, Tuple[int, ...]]

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "cond_stage_model.transformer.embeddings.token_embedding.weight")
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
SDXL_TEXT_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_TEXT_G = "conditioner.embedders.1.model.token_embedding.weight"
REFINER_TEXT_G = "conditioner.embedders.0.model.token_embedding.weight"


@dataclass
class Detection:
    family: str  # sd1 | sd2 | sdxl (the weights cannot tell sd2 epsilon from sd2 v)
    inpainting: bool
    notes: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        names = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL base"}
        return names[self.family] + (" inpainting" if self.inpainting else "")


def _any(keys, *needles) -> bool:
    return any(n in k for k in keys for n in needles)


def _what_else(keys) -> str:
    """Name what a non-SD file most likely is, for the refusal sentence."""
    if _any(keys, "lora_unet_", "lora_te", ".lora_down.", ".lora_A.", "lora.down", ".hada_w1_", ".lokr_w1"):
        return "a LoRA/LyCORIS network, not a full checkpoint (use it with <lora:NAME:1> in the prompt)"
    if _any(keys, "joint_blocks.", "x_embedder.proj"):
        return "a Stable Diffusion 3 model, which this extension does not train"
    if _any(keys, "double_blocks.", "single_blocks.", "img_in.weight"):
        return "a Flux model, which this extension does not train"
    if REFINER_TEXT_G in keys:
        return "an SDXL refiner, which is not trained with DreamBooth; pick an SDXL base model"
    if _any(keys, "down_blocks.", "up_blocks.", "mid_block.") and not _any(keys, "model.diffusion_model."):
        return "a diffusers-format component file, not a single-file checkpoint; point at the whole diffusers folder instead"
    if _any(keys, "encoder.down.", "decoder.up.") and not _any(keys, "model.diffusion_model."):
        return "a VAE on its own, not a full checkpoint"
    if _any(keys, "emb_params", "string_to_param"):
        return "a textual-inversion embedding, not a checkpoint"
    if _any(keys, "control_model.", "input_hint_block"):
        return "a ControlNet model, not a base checkpoint"
    if _any(keys, "model.diffusion_model.") and not _any(keys, "first_stage_model.", "cond_stage_model.", "conditioner."):
        return "a UNet without its VAE and text encoder, not a full checkpoint"
    return "not a Stable Diffusion 1.x, 2.x or SDXL checkpoint this extension recognises"


def detect_family(shapes: Shapes, filename: str = "the file") -> Detection:
    """Family of a single-file checkpoint; raises UserError for anything we do not train."""
    from dreambooth_ext.errors import UserError

    keys = set(shapes)
    unet_in = shapes.get(UNET_IN)
    if unet_in is None:
        raise UserError(f"{filename} is {_what_else(keys)}.")
    channels = unet_in[1] if len(unet_in) == 4 else None
    if channels not in (4, 9):
        hint = " (8 input channels: an instruct-pix2pix model)" if channels == 8 else ""
        raise UserError(f"{filename} has a UNet with {channels} input channels{hint}; only 4 (normal) and 9 (inpainting) are supported.")
    inpainting = channels == 9
    if SDXL_TEXT_L in keys and SDXL_TEXT_G in keys:
        return Detection("sdxl", inpainting)
    if SD2_TEXT in keys:
        return Detection("sd2", inpainting, ["SD2 weights do not say whether the model predicts noise (epsilon) or v; "
                                             "epsilon is assumed unless a beside-yaml or --family sd2-v says v."])
    if any(k in keys for k in SD1_TEXT):
        return Detection("sd1", inpainting)
    raise UserError(f"{filename} is {_what_else(keys)}.")
