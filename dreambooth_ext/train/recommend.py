"""Recommended settings for a family, a training mode and the GPU's memory: a pure function the tab calls.

Candidates run from the best (fastest, most capacity) to the leanest; the first whose estimated
peak (memory.py, plus its stated error and the CUDA context) fits the GPU wins. Full training that
fits in no candidate becomes LoRA.
"""

from typing import Any, Dict, List, Optional

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import FAMILIES, choices_of
from dreambooth_ext.train.memory import MemorySettings, estimate_memory

_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
CUDA_CONTEXT_GB = 0.5  # outside torch's allocator, so outside the estimate


def recommended(family: str, train_mode: str, vram_gb: Optional[float], *, have_bitsandbytes: bool = True,
                have_bf16: bool = True) -> Dict[str, Any]:
    """Setting overrides for a family, a training mode and the GPU's memory (None: unknown, no memory trade-offs).

    May switch train_mode to 'lora' when full training cannot fit. Pure: checks nothing on the machine.
    have_bf16=False (a GPU older than Ampere, trained in fp16) rules out the fused backward pass.
    """
    if family not in FAMILIES:
        raise UserError(f"Unknown model family '{family}'; choose one of {', '.join(FAMILIES)}.")
    if train_mode not in choices_of("train_mode"):
        raise UserError(f"Unknown train mode '{train_mode}'; choose {' or '.join(choices_of('train_mode'))}.")
    fam = "sd1" if family == "auto" else family
    out: Dict[str, Any] = {"train_batch_size": 1, "cache_latents": True, "mixed_precision": "auto", "attention": "auto"}
    if family != "auto":
        out["resolution"] = _RESOLUTION[family]
    if vram_gb is None:  # unknown memory: the plain settings, no trade-off either way
        plain = {**_full_candidates(fam, False, False)[-1], "optimizer": "adamw"} if train_mode == "full" else _lora_candidates(fam)[0]
        out.update({k: v for k, v in plain.items() if k != "gradient_checkpointing"})
        return out
    chosen = None
    if train_mode == "full":
        chosen = _first_fitting(fam, _full_candidates(fam, have_bitsandbytes, have_bf16), vram_gb)
    if chosen is None:
        lora = _lora_candidates(fam)
        chosen = _first_fitting(fam, lora, vram_gb) or lora[-1]
    out.update(chosen)
    return out


def fits(upper_gb: float, vram_gb: float) -> bool:
    """The estimate plus its margin (MemoryEstimate.upper_gb) and the CUDA context within the GPU's memory."""
    return upper_gb + CUDA_CONTEXT_GB <= vram_gb


def _first_fitting(fam: str, candidates: List[Dict[str, Any]], vram_gb: float) -> Optional[Dict[str, Any]]:
    for c in candidates:
        settings = MemorySettings(
            family=fam, train_mode=c["train_mode"], text_encoder_mode=c["text_encoder_mode"], optimizer=c["optimizer"],
            mixed_precision="bf16", resolution=_RESOLUTION[fam], batch_size=1, prior_preservation=True,
            gradient_checkpointing=c["gradient_checkpointing"], fused_backward=c["fused_backward_pass"],
            cache_latents=True,
            cache_text_embeddings=c["cache_text_embeddings"], lora_rank=c.get("lora_rank", 16))
        if fits(estimate_memory(settings).upper_gb, vram_gb):
            return c
    return None


def _lora_candidates(fam: str) -> List[Dict[str, Any]]:
    # LoRA's optimizer states are tiny, so plain AdamW; memory goes to activations instead.
    base = {"train_mode": "lora", "optimizer": "adamw", "lora_learning_rate": 1e-4,
            "lora_rank": 32 if fam == "sdxl" else 16, "lora_alpha": 0.0, "text_encoder_mode": "frozen",
            "cache_text_embeddings": True, "fused_backward_pass": False}
    return [{**base, "gradient_checkpointing": False}, {**base, "gradient_checkpointing": True}]


def _full_candidates(fam: str, have_bitsandbytes: bool, have_bf16: bool) -> List[Dict[str, Any]]:
    base = {"train_mode": "full", "optimizer": "adamw", "learning_rate": 1e-6 if fam == "sdxl" else 2e-6,
            "text_encoder_mode": "frozen", "cache_text_embeddings": True, "fused_backward_pass": False}
    # each gradient freed as its weight is updated: one fp32 copy of the UNet less, the same optimizer
    fused = {"fused_backward_pass": True, "gradient_accumulation_steps": 1} if have_bf16 else None
    out = []
    if fam != "sdxl":
        # room to spare: training the text encoder too improves likeness (diffusers' advice for faces)
        out.append({**base, "gradient_checkpointing": False, "text_encoder_mode": "full", "text_encoder_lr": 1e-6,
                    "cache_text_embeddings": False})
    lean = [{**base, "gradient_checkpointing": False}, {**base, "gradient_checkpointing": True}]
    if have_bitsandbytes:
        lean.append({**base, "gradient_checkpointing": True, "optimizer": "adamw8bit"})
    # the leanest: Adafactor keeps factored statistics, about half a weight's size on SD1/SD2's convolution-heavy
    # UNets and a tenth on SDXL's, against AdamW's two full fp32 states
    lean.append({**base, "gradient_checkpointing": True, "optimizer": "adafactor"})
    for c in lean:
        out.append(c)
        if fused and c["gradient_checkpointing"]:
            out.append({**c, **fused})
    return out
