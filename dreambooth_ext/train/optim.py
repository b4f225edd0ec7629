"""Optimizers and learning-rate schedules for the trainer, chosen by name from the training config.

    groups = [{"params": unet_params, "lr": 2e-6}, {"params": te_params, "lr": 1e-6}]
    opt = make_optimizer(cfg.optimizer, groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                         eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, device=device)
    sched = make_lr_scheduler(cfg.lr_scheduler, opt, warmup_steps=cfg.lr_warmup_steps,
                              total_steps=cfg.max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)

The optimizers are declared in optimizer_kinds.py (name, label, what each needs); each gets its builder
here with `@builds(name)`. An optimizer that cannot run here (bitsandbytes without a CUDA GPU, Prodigy not
installed) is refused with a UserError before training starts (`refusal` is its sentence);
`optimizer_available` tells a form which choices to offer.
"""

import importlib
import inspect
import math
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import SCHEDULERS as SCHEDULER_NAMES
from dreambooth_ext.train.optimizer_kinds import NAMES as OPTIMIZER_NAMES
from dreambooth_ext.train.optimizer_kinds import OPTIMIZERS

DeviceLike = Union[str, torch.device]


# ---------------------------------------------------------------------------------------------
# Optimizers: what each needs is declared in optimizer_kinds.py, how each is built is attached here

# name -> build(groups, betas, eps, weight_decay, package) where package is the kind's module, imported
BUILDERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {}


def builds(name: str):
    """Attach the decorated function as the builder of the optimizer `name` declared in optimizer_kinds."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer '{name}' is not declared in optimizer_kinds.py")

    def attach(build):
        BUILDERS[name] = build
        return build

    return attach


def _import(module: str) -> Tuple[Any, str]:
    """(module, "") or (None, why not); any failure counts, as bitsandbytes may raise more than ImportError."""
    try:
        return importlib.import_module(module), ""
    except Exception as e:  # noqa: BLE001 - a broken install is just "not available"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, first


def optimizer_available(name: str, device: DeviceLike) -> Tuple[bool, str]:
    """Whether optimizer `name` can run on `device`, and if not, why (a short phrase for a form or a message)."""
    device = torch.device(device)
    kind = OPTIMIZERS.get(name)
    if kind is None or name not in BUILDERS:
        return False, f"unknown optimizer '{name}'"
    if kind.needs_cuda and device.type != "cuda":
        return False, f"training runs on {device.type}, not an NVIDIA GPU"
    if kind.package:
        module, why = _import(kind.package)
        if module is None:
            return False, f"{kind.package} does not import: {why}"
    return True, ""


def refusal(name: str, why: str) -> str:
    """The sentence refusing optimizer `name`, which cannot run here for the reason `why` (optimizer_available's)."""
    kind = OPTIMIZERS.get(name)
    if kind is None:
        return f"Setting 'optimizer' is '{name}'; choose one of {', '.join(OPTIMIZER_NAMES)}."
    needs = kind.package
    if kind.needs_cuda:
        needs = f"{needs} on an NVIDIA GPU" if needs else "an NVIDIA GPU"
    what = f"{kind.label} needs {needs}; " if needs else ""
    return f"Setting 'optimizer' is {name}: {what}it is not available here ({why}); {kind.remedy}."


def _all_params(param_groups: Sequence[Dict[str, Any]]) -> List[torch.Tensor]:
    return [p for g in param_groups for p in g["params"]]


def _supports_fused_adamw() -> bool:
    return "fused" in inspect.signature(torch.optim.AdamW.__init__).parameters


def _fused_adamw(groups, betas, eps, weight_decay):
    """AdamW's one-kernel update, or None where this torch has none for these parameters.

    torch 2.1 (the WebUI's) fuses on CUDA only and refuses CPU parameters as the optimizer is built;
    later versions fuse on the CPU too, where it is several times faster than the per-tensor loop.
    """
    params = _all_params(groups)
    if not params or not _supports_fused_adamw():
        return None
    if not all(p.is_floating_point() for p in params) or len({p.device.type for p in params}) != 1:
        return None
    try:
        return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return None  # this build does not fuse on this device or dtype: the paths below still work


@builds("adamw")
def _adamw(groups, betas, eps, weight_decay, package) -> torch.optim.Optimizer:
    fused = _fused_adamw(groups, betas, eps, weight_decay)
    if fused is not None:
        return fused
    params = _all_params(groups)
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    # foreach batches the update over tensors; on CPU torch's own choice (per-tensor loop) is what is left
    return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay,
                             foreach=True if on_cuda else None)


@builds("adamw8bit")
def _adamw8bit(groups, betas, eps, weight_decay, package) -> torch.optim.Optimizer:
    return package.optim.AdamW8bit(groups, betas=betas, eps=eps, weight_decay=weight_decay)


@builds("lion8bit")
def _lion8bit(groups, betas, eps, weight_decay, package) -> torch.optim.Optimizer:
    # Lion has no epsilon: its update is a sign
    return package.optim.Lion8bit(groups, betas=betas, weight_decay=weight_decay)


@builds("adafactor")
def _adafactor(groups, betas, eps, weight_decay, package) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # the schedule comes from our LR scheduler, so Adafactor's own relative step and scaling are off
    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=weight_decay)


@builds("prodigy")
def _prodigy(groups, betas, eps, weight_decay, package) -> torch.optim.Optimizer:
    # bias correction and the warmup safeguard are what diffusion fine-tuning usually needs (Prodigy README)
    return package.Prodigy(groups, betas=betas, eps=eps, weight_decay=weight_decay, decouple=True,
                           use_bias_correction=True, safeguard_warmup=True)


def make_optimizer(name: str, param_groups: List[Dict[str, Any]], *, betas: Tuple[float, float], eps: float,
                   weight_decay: float, device: DeviceLike) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` (each {"params": [...], "lr": float}); UserError if it cannot run here.

    Group order is kept, so a caller can find the text encoder's group by index (e.g. to stop it).
    """
    device = torch.device(device)
    groups = [dict(g, params=list(g["params"])) for g in param_groups]
    if not _all_params(groups):
        raise ValueError("make_optimizer got no parameters to train")
    betas = (float(betas[0]), float(betas[1]))
    ok, why = optimizer_available(name, device)
    if not ok:
        raise UserError(refusal(name, why))
    package = _import(OPTIMIZERS[name].package)[0] if OPTIMIZERS[name].package else None
    return BUILDERS[name](groups, betas, eps, weight_decay, package)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules

class _Schedule:
    """LR multiplier at optimizer step `step` (0-based: the step about to be taken).

    Warmup ramps (step + 1) / (warmup + 1): the first step already moves, step `warmup` is at full LR.
    The decay part reaches 0 at step `total_steps`, just past the last step, so no step is wasted at LR 0.
    """

    def __init__(self, name: str, warmup_steps: int, total_steps: int, num_cycles: int, power: float):
        self.name = name
        self.warmup_steps = 0 if name == "constant" else int(warmup_steps)
        self.total_steps = int(total_steps)
        self.num_cycles = int(num_cycles)
        self.power = float(power)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.name in ("constant", "constant_with_warmup"):
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.name == "linear":
            return 1.0 - progress
        if self.name == "polynomial":
            return (1.0 - progress) ** self.power
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        # cosine_with_restarts: num_cycles full cosine decays, each jumping back to full LR
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0)))


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                      num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR for schedule `name`; call its step() once per optimizer step.

    Every schedule but 'constant' first warms up over `warmup_steps`. state_dict()/load_state_dict()
    round trip the step count, so a resumed run with the same settings continues the same curve.
    """
    if name not in SCHEDULER_NAMES:
        raise UserError(f"Setting 'lr_scheduler' is '{name}'; choose one of {', '.join(SCHEDULER_NAMES)}.")
    if total_steps < 1:
        raise UserError(f"Setting 'max_steps' is {total_steps}; it must be at least 1.")
    if warmup_steps < 0:
        raise UserError(f"Setting 'lr_warmup_steps' is {warmup_steps}; it must be 0 or more.")
    if num_cycles < 1:
        raise UserError(f"Setting 'lr_num_cycles' is {num_cycles}; it must be at least 1.")
    schedule = _Schedule(name, warmup_steps, total_steps, num_cycles, power)
    # a plain function, so LambdaLR's state holds only the step count: a run resumed with more
    # steps follows the curve of the settings it is resumed with, not the saved ones
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
