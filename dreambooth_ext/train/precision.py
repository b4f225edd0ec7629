"""Device, mixed precision, loss scaling and attention kernels, decided at run time from what the machine has.

    device = pick_device()
    mode, notes = resolve_mixed_precision(cfg.mixed_precision, device)   # "no" | "fp16" | "bf16"
    scaler = make_loss_scaler(mode, device)                               # one code path with or without fp16
    with autocast_context(mode, device):
        loss = ...
    scaler.backward(loss); scaler.unscale_(opt); clip; scaler.step(opt); applied = scaler.update()
    used = choose_attention(cfg.attention, device, unet, warn=report.warn)

Every GPU-only path (bf16 checks, GradScaler, xformers) is taken only on CUDA; a CPU run is plain fp32
(or bf16 autocast when asked) and goes through the same calls.
"""

import contextlib
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from dreambooth_ext.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "fp16", "bf16")
ATTENTIONS = ("auto", "xformers", "sdpa", "default")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}

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
            return "no", [f"mixed_precision fp16 needs a CUDA GPU; training on {device.type} in fp32 instead."]
        return ("bf16" if setting == "bf16" else "no"), []
    if setting == "auto":
        return ("bf16" if _native_bf16() else "fp16"), []
    if setting == "bf16" and not _native_bf16():
        return "fp16", ["mixed_precision bf16 is not native on this GPU (it needs an RTX 30xx/A100 or newer); "
                        "using fp16 with loss scaling instead."]
    return setting, []


def autocast_context(mode: str, device: DeviceLike):
    """torch.autocast for fp16/bf16, or a do-nothing context for "no"."""
    device = torch.device(device)
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[mode])


def trainable_dtype(mode: str, device: DeviceLike, *, trained: bool = False, module: str = "") -> torch.dtype:
    """The dtype to keep a module's weights in.

    Trained weights always stay fp32 (the master weights the optimizer updates; autocast does the
    half-precision math). Frozen modules (VAE, a frozen text encoder, the UNet under LoRA) are stored in
    the mixed-precision dtype on CUDA to save memory, except the VAE under fp16: SD VAEs overflow to NaN
    in fp16 (the WebUI's --no-half-vae), and with cached latents the VAE runs only once anyway.
    """
    device = torch.device(device)
    if trained or mode == "no" or device.type != "cuda":
        return torch.float32
    if module == "vae" and mode == "fp16":
        return torch.float32
    return _DTYPES[mode]


# ---------------------------------------------------------------------------------------------
# Loss scaling

def _cuda_grad_scaler():
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()  # torch < 2.3 (the WebUI's default 2.1.2)


class LossScaler:
    """fp16 loss scaling through torch's GradScaler, or plain backward/step when it is not needed.

    The training loop calls the same methods either way. `update()` says whether the step just taken was
    applied: with fp16 an overflow skips it, and the LR scheduler should then not advance.
    """

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self._scaler = _cuda_grad_scaler() if self.enabled else None

    def backward(self, loss: torch.Tensor) -> None:
        if self._scaler is None:
            loss.backward()
        else:
            self._scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true size (call before clipping them)."""
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._scaler is None:
            optimizer.step()
        else:
            self._scaler.step(optimizer)

    def update(self) -> bool:
        """Adjust the scale for the next step; False when the step just taken was skipped (inf/NaN gradients)."""
        if self._scaler is None:
            return True
        before = self._scaler.get_scale()
        self._scaler.update()
        # GradScaler lowers the scale exactly when it found inf/NaN and skipped the step
        return self._scaler.get_scale() >= before

    @property
    def scale(self) -> float:
        return self._scaler.get_scale() if self._scaler is not None else 1.0

    def state_dict(self) -> Dict[str, Any]:
        return self._scaler.state_dict() if self._scaler is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # a state saved without scaling (or resumed on another precision) leaves the fresh scale in place
        if self._scaler is not None and state:
            self._scaler.load_state_dict(state)


def make_loss_scaler(mode: str, device: DeviceLike) -> LossScaler:
    """Scaling only for fp16 on CUDA: bf16 and fp32 have fp32's range and need none."""
    return LossScaler(enabled=(mode == "fp16" and torch.device(device).type == "cuda"))


# ---------------------------------------------------------------------------------------------
# Attention

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


def choose_attention(setting: str, device: DeviceLike, unet, *, warn: Optional[Callable[[str], None]] = None) -> str:
    """Set the UNet's attention kernel for the setting; returns the one used ("xformers", "sdpa" or "default").

    auto: xformers when it imports and works on CUDA, else PyTorch SDPA. An explicit xformers that
    cannot work is a UserError; auto falls back quietly, or with a warning when xformers imports but fails.
    """
    warn = warn or log.warning
    device = torch.device(device)
    if setting not in ATTENTIONS:
        raise UserError(f"Setting 'attention' is '{setting}'; choose one of {', '.join(ATTENTIONS)}.")
    if setting in ("sdpa", "default"):
        return _set_processor(unet, setting)
    if device.type != "cuda":
        if setting == "xformers":
            raise UserError(f"Setting 'attention' is xformers, which needs an NVIDIA GPU, but training runs on "
                            f"{device.type}; choose auto or sdpa.")
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
