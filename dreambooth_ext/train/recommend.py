"""Recommended settings for a family, a training mode and the GPU's memory: a pure function the tab calls."""

from typing import Any, Dict, Optional

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import FAMILIES

_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
# Smallest GPU memory (GB) that full UNet training fits in, and below which it needs 8-bit Adam and
# checkpointing: fp32 master weights + grads + Adam states are ~16 bytes per UNet parameter.
_FULL_FITS = {"sd1": 10, "sd2": 10, "sd2-v": 12, "sdxl": 40}
_FULL_ROOMY = {"sd1": 24, "sd2": 24, "sd2-v": 24, "sdxl": 80}
_LORA_ROOMY = {"sd1": 12, "sd2": 12, "sd2-v": 16, "sdxl": 24}


def recommended(family: str, train_mode: str, vram_gb: Optional[float], *, have_bitsandbytes: bool = True) -> Dict[str, Any]:
    """Setting overrides for a family, a training mode and the GPU's memory (None: unknown, no memory trade-offs).

    May switch train_mode to 'lora' when full training cannot fit. Pure: checks nothing on the machine.
    """
    if family not in FAMILIES:
        raise UserError(f"Unknown model family '{family}'; choose one of {', '.join(FAMILIES)}.")
    if train_mode not in ("full", "lora"):
        raise UserError(f"Unknown train mode '{train_mode}'; choose full or lora.")
    fam = "sd1" if family == "auto" else family
    out: Dict[str, Any] = {"train_batch_size": 1, "cache_latents": True, "mixed_precision": "auto", "attention": "auto"}
    if family != "auto":
        out["resolution"] = _RESOLUTION[family]
    if train_mode == "full" and vram_gb is not None and vram_gb < _FULL_FITS[fam]:
        train_mode = "lora"  # full training does not fit: adapters do
    out["train_mode"] = train_mode
    if train_mode == "lora":
        out.update(_lora_overrides(fam, vram_gb))
    else:
        out.update(_full_overrides(fam, vram_gb, have_bitsandbytes))
    return out


def _lora_overrides(fam: str, vram_gb: Optional[float]) -> Dict[str, Any]:
    # LoRA's optimizer states are tiny, so plain AdamW; memory goes to activations instead.
    out = {"optimizer": "adamw", "lora_learning_rate": 1e-4, "lora_rank": 32 if fam == "sdxl" else 16,
           "lora_alpha": 0.0, "text_encoder_mode": "frozen", "cache_text_embeddings": True}
    if vram_gb is not None:
        out["gradient_checkpointing"] = vram_gb < _LORA_ROOMY[fam]
    return out


def _full_overrides(fam: str, vram_gb: Optional[float], have_bitsandbytes: bool) -> Dict[str, Any]:
    out = {"optimizer": "adamw", "learning_rate": 1e-6 if fam == "sdxl" else 2e-6, "text_encoder_mode": "frozen",
           "cache_text_embeddings": True}
    if vram_gb is None:
        return out
    roomy = vram_gb >= _FULL_ROOMY[fam]
    out["gradient_checkpointing"] = not roomy or fam == "sdxl"
    if not roomy:
        out["optimizer"] = "adamw8bit" if have_bitsandbytes else "adafactor"
    elif fam != "sdxl":
        # room to spare: training the text encoder too improves likeness (diffusers' advice for faces)
        out.update(text_encoder_mode="full", text_encoder_lr=1e-6, cache_text_embeddings=False)
    return out
