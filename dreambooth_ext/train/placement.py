"""Where every module lives, in which dtype, in each phase of a run: decided once from settings and machine.

    placement, notes = decide_placement(cfg, pick_device())
    bundle = load_bundle(folder, dtypes=placement.load_dtypes())     # frozen modules arrive in half precision
    placement.enter(bundle, "prepare")      # everything on the training device: class images, latent caching
    with placement.autocast(): ...          # inference and the forward pass in the mixed-precision dtype
    placement.enter(bundle, "train")        # modules whose outputs are cached leave the device
    placement.enter(bundle, "sample")       # back on the device for samples, then "train" again

Trained weights stay fp32 (the optimizer's master copies); frozen ones are stored in the
mixed-precision dtype, except the VAE under fp16 (SD VAEs overflow in fp16). On a CPU every module
is fp32 unless DREAMBOOTH_EMULATE_GPU_DTYPES=bf16 is set: then the CPU gets a GPU's layout (frozen
modules bf16, bf16 autocast), so the tests see the dtype mistakes a GPU run would make.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from dreambooth_ext.bridge.components import TEXT_ENCODER
from dreambooth_ext.dtypes import NO_MIXED_PRECISION, compute_dtype, dtype_name
from dreambooth_ext.errors import UserError

EMULATE_ENV = "DREAMBOOTH_EMULATE_GPU_DTYPES"
PHASES = ("prepare", "train", "sample")


def emulated_mode() -> str:
    """'bf16' when the CPU stand-in for a GPU's dtype layout is asked for, else ''."""
    value = os.environ.get(EMULATE_ENV, "").strip().lower()
    if value in ("", "0", "no", "off"):
        return ""
    if value != "bf16":
        raise UserError(f"{EMULATE_ENV} is '{value}'; the CPU can stand in for a GPU only with bf16 (or unset it).")
    return "bf16"


@dataclass(frozen=True)
class Placement:
    device: torch.device
    mode: str  # accelerate's mixed_precision: no | fp16 | bf16
    unet_dtype: torch.dtype
    vae_dtype: torch.dtype
    text_encoder_dtype: torch.dtype
    vae_off_device_in_training: bool  # latents are cached: the VAE waits on the CPU
    text_encoders_off_device_in_training: bool  # embeddings are cached: the frozen encoders wait on the CPU

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype autocast runs matrix maths in (fp32 without mixed precision)."""
        return compute_dtype(self.mode)

    def autocast(self):
        """Mixed precision for inference and the training forward pass; a no-op without it."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.mode != NO_MIXED_PRECISION)

    def on(self, device) -> "Placement":
        """The same layout on another device (the process's own GPU under `accelerate launch`)."""
        return dataclasses.replace(self, device=torch.device(device))

    def load_dtypes(self) -> Dict[str, torch.dtype]:
        return {"unet": self.unet_dtype, "vae": self.vae_dtype, TEXT_ENCODER: self.text_encoder_dtype}

    def where(self, phase: str) -> Dict[str, torch.device]:
        """Device of the UNet, the VAE and the text encoders in a phase."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        cpu, dev = torch.device("cpu"), self.device
        training = phase == "train"
        return {"unet": dev,
                "vae": cpu if training and self.vae_off_device_in_training else dev,
                TEXT_ENCODER: cpu if training and self.text_encoders_off_device_in_training else dev}

    def enter(self, bundle, phase: str) -> None:
        """Move the bundle's modules where the phase wants them (dtypes stay as loaded)."""
        devices = self.where(phase)
        _move(bundle.unet, devices["unet"])
        _move(bundle.vae, devices["vae"])
        for te in bundle.text_encoders:
            _move(te, devices[TEXT_ENCODER])
        if self.device.type == "cuda" and phase == "train":
            torch.cuda.empty_cache()  # what sampling or caching left behind goes back to the pool

    def describe(self) -> str:
        return (f"UNet {dtype_name(self.unet_dtype)}, VAE {dtype_name(self.vae_dtype)}, "
                f"text encoder {dtype_name(self.text_encoder_dtype)}")


def _move(module: torch.nn.Module, device: torch.device) -> None:
    # every parameter is looked at: adapters added after loading must follow their module too
    if any(p.device != device for p in module.parameters()):
        module.to(device)


def stored_dtype(mode: str, *, trained: bool, module: str = "", half_frozen: bool = True) -> torch.dtype:
    """A module's weight dtype: fp32 when trained, without mixed precision, or when the VAE meets fp16."""
    if trained or mode == NO_MIXED_PRECISION or not half_frozen:
        return torch.float32
    if module == "vae" and mode == "fp16":
        return torch.float32
    return compute_dtype(mode)


def decide_placement(cfg, device: torch.device) -> Tuple[Placement, List[str]]:
    """The placement for a run's settings on `device`, and warnings for the user."""
    from dreambooth_ext.train.precision import resolve_mixed_precision

    device = torch.device(device)
    mode, notes = resolve_mixed_precision(cfg.mixed_precision, device)
    emulate = device.type == "cpu" and emulated_mode()
    if emulate:
        mode = emulate
    half = device.type == "cuda" or bool(emulate)
    te_full = cfg.text_encoder_mode == "full"
    te_frozen = cfg.text_encoder_mode == "frozen"
    placement = Placement(
        device=device, mode=mode,
        unet_dtype=stored_dtype(mode, trained=cfg.train_mode == "full", half_frozen=half),
        vae_dtype=stored_dtype(mode, trained=False, module="vae", half_frozen=half),
        text_encoder_dtype=stored_dtype(mode, trained=te_full, half_frozen=half),
        vae_off_device_in_training=bool(cfg.cache_latents),
        text_encoders_off_device_in_training=te_frozen and bool(cfg.cache_text_embeddings))
    return placement, notes


def forget_last_accelerator() -> None:
    """Let this run's Accelerator take its own mixed precision.

    accelerate keeps one state per process and refuses a second Accelerator with another precision; the
    WebUI trains many runs in one process. A data-parallel launch (several processes) keeps its state.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
