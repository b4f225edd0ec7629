"""Device, mixed precision and attention kernels, decided at run time from what the machine has.

    device = pick_device()
    mode, notes = resolve_mixed_precision(cfg.mixed_precision, device)   # "no" | "fp16" | "bf16"
    dtype = trainable_dtype(mode, device, trained=False, module="vae")   # see placement.py for the run's layout
    used = choose_attention(cfg.attention, device, unet, warn=report.warn)

Autocast and fp16 loss scaling are accelerate's (the trainer's Accelerator gets `mode`), so a
data-parallel run under `accelerate launch` and a single-process run take the same path. Every
GPU-only path (bf16 checks, xformers) is taken only on CUDA; a CPU run is plain fp32.
"""

import logging
from typing import Callable, List, Optional, Tuple, Union

import torch

from dreambooth_ext.dtypes import NO_MIXED_PRECISION
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import choices_of

log = logging.getLogger(__name__)

PRECISIONS = choices_of("mixed_precision")
ATTENTIONS = choices_of("attention")

DeviceLike = Union[str, torch.device]


def pick_device(prefer: Optional[str] = None) -> torch.device:
    """`prefer` ('cuda', 'cuda:1', 'cpu') when usable, else the CUDA GPU when there is one, else the CPU."""
    if prefer:
        try:
            device = torch.device(prefer)
        except RuntimeError:
            raise UserError(f"Device '{prefer}' is not a device name; use cuda, cuda:N or cpu.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"Device '{prefer}' was asked for but no CUDA GPU is visible; use cpu or check the "
                            "GPU driver and the torch build.")
        if device.type not in ("cuda", "cpu"):
            raise UserError(f"Device '{prefer}' is not supported; use cuda, cuda:N or cpu.")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere and later); newer torch also reports slow emulation unless told not to."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation and reports hardware support only
        return bool(torch.cuda.is_bf16_supported())


def resolve_mixed_precision(setting: str, device: DeviceLike) -> Tuple[str, List[str]]:
    """The mode to train in ("no", "fp16" or "bf16") for the setting on this device, and warnings for the user.

    auto: bf16 on GPUs with native bf16, else fp16 (with loss scaling); plain fp32 on a CPU.
    fp16 on a CPU falls back to fp32 (CPU autocast is meant for bf16); bf16 on a CPU is allowed.
    """
    device = torch.device(device)
    if setting not in PRECISIONS:
        raise UserError(f"Setting 'mixed_precision' is '{setting}'; choose one of {', '.join(PRECISIONS)}.")
    if device.type != "cuda":
        if setting == "fp16":
            return NO_MIXED_PRECISION, [f"mixed_precision fp16 needs a CUDA GPU; training on {device.type} in fp32 instead."]
        return ("bf16" if setting == "bf16" else NO_MIXED_PRECISION), []
    if setting == "auto":
        return ("bf16" if _native_bf16() else "fp16"), []
    if setting == "bf16" and not _native_bf16():
        return "fp16", ["mixed_precision bf16 is not native on this GPU (it needs an RTX 30xx/A100 or newer); "
                        "using fp16 with loss scaling instead."]
    return setting, []


def trainable_dtype(mode: str, device: DeviceLike, *, trained: bool = False, module: str = "") -> torch.dtype:
    """The dtype a module's weights are kept in on `device` (placement.stored_dtype decides; see there).

    Trained weights stay fp32 (the master weights the optimizer updates; autocast does the
    half-precision math); frozen ones are half precision on CUDA, except the VAE under fp16.
    """
    from dreambooth_ext.train.placement import stored_dtype

    return stored_dtype(mode, trained=trained, module=module, half_frozen=torch.device(device).type == "cuda")


def _xformers_importable() -> Tuple[bool, str]:
    try:
        import xformers  # noqa: F401
        import xformers.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken build is just "not available"
        return False, (str(e).strip().splitlines() or [type(e).__name__])[0]
    return True, ""


def _set_processor(unet, name: str) -> str:
    """Set the classic or the SDPA processor on every attention layer; the name actually set."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if name == "sdpa" and hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        unet.set_attn_processor(AttnProcessor2_0())
        return "sdpa"
    unet.set_attn_processor(AttnProcessor())
    return "default"


def check_attention(setting: str, device: DeviceLike) -> None:
    """Refuse, before any work, an attention setting the machine cannot run (the model is not needed yet)."""
    device = torch.device(device)
    if setting not in ATTENTIONS:
        raise UserError(f"Setting 'attention' is '{setting}'; choose one of {', '.join(ATTENTIONS)}.")
    if setting == "xformers" and device.type != "cuda":
        raise UserError(f"Setting 'attention' is xformers, which needs an NVIDIA GPU, but training runs on "
                        f"{device.type}; choose auto or sdpa.")
    if setting == "xformers":
        ok, why = _xformers_importable()
        if not ok:
            raise UserError(f"Setting 'attention' is xformers but it does not work here ({why}); choose auto or sdpa.")


def choose_attention(setting: str, device: DeviceLike, unet, *, warn: Optional[Callable[[str], None]] = None) -> str:
    """Set the UNet's attention kernel for the setting; returns the one used ("xformers", "sdpa" or "default").

    auto: xformers when it imports and works on CUDA, else PyTorch SDPA. An explicit xformers that
    cannot work is a UserError; auto falls back quietly, or with a warning when xformers imports but fails.
    """
    warn = warn or log.warning
    device = torch.device(device)
    check_attention(setting, device)
    if setting in ("sdpa", "default"):
        return _set_processor(unet, setting)
    if device.type != "cuda":
        return _set_processor(unet, "sdpa")
    ok, why = _xformers_importable()
    if ok:
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # noqa: BLE001 - a wheel built for another torch/CUDA fails only here
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if setting == "xformers":
        raise UserError(f"Setting 'attention' is xformers but it does not work here ({why}); choose auto or sdpa.")
    if ok:  # imported but failed: worth telling; not installed is the normal case
        warn(f"xformers attention failed ({why}); using PyTorch SDPA attention instead.")
    return _set_processor(unet, "sdpa")
