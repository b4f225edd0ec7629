"""The optimizer step inside the backward pass (kohya's and OneTrainer's "fused backward pass").

Each trained tensor is updated as soon as its gradient is complete, and the gradient is freed at
once, so the gradients of the whole model never exist together: the peak memory of a step drops by
about one fp32 copy of the trained weights (3.4 GB for a full SD1.5 UNet, 10 GB for SDXL's).

    fused = FusedBackward(torch_optimizer, max_grad_norm)   # hooks on every trained tensor
    with fused.armed():
        loss.backward()                                     # the weights change during this call
    fused.remove()

What it cannot do, and so refuses (`refusal`): add up gradients over micro-batches, scale the loss
for fp16 (the scaler must see every gradient before any weight changes), average gradients across
processes, or run Prodigy (its step size is estimated from all gradients at once). Clipping is per
tensor: each gradient is clipped to max_grad_norm on its own, as the global norm is never known.
"""

import contextlib
from typing import Callable, List

import torch

from dreambooth_ext.errors import UserError

SETTING = "fused_backward_pass"


def refusal(*, accumulation: int, mixed_precision: str, optimizer: str, processes: int = 1) -> str:
    """Why the fused backward pass cannot run with these settings ('' when it can)."""
    why = []
    if accumulation > 1:
        why.append(f"gradient_accumulation_steps is {accumulation} (the gradients of several micro-batches "
                   "must be added up before a step; set it to 1 and raise train_batch_size instead)")
    if mixed_precision == "fp16":
        why.append("the mixed precision is fp16, whose loss scaling must see every gradient before any weight "
                   "changes (choose bf16, or no)")
    if optimizer == "prodigy":
        why.append("Prodigy estimates its step size from all gradients at once (choose adamw, adafactor or an "
                   "8-bit optimizer)")
    if processes > 1:
        why.append(f"the run has {processes} processes, whose gradients are averaged after the backward pass "
                   "(train on one GPU)")
    if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        why.append(f"this torch ({torch.__version__}) has no per-tensor gradient hooks (torch 2.1 or later has)")
    if not why:
        return ""
    return f"Setting '{SETTING}' cannot be used here: " + "; ".join(why) + f". Turn {SETTING} off, or change that."


class FusedBackward:
    """Per-tensor optimizer steps run by gradient hooks; between `armed()` blocks the hooks do nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0):
        self.optimizer = optimizer  # torch's own optimizer, not accelerate's wrapper (whose step syncs)
        self.max_grad_norm = float(max_grad_norm)
        self._armed = False
        self._stepped = set()  # tensors stepped in the armed block now running
        self._handles = []
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def step(p: torch.Tensor) -> None:
            if self._armed and p.grad is not None:
                self._step_one(index, p)
        return step

    def _step_one(self, index: int, p: torch.Tensor) -> None:
        if id(p) in self._stepped:  # its gradient came in pieces: a second step would be wrong maths
            raise UserError(f"The fused backward pass got a second gradient for one tensor ({tuple(p.shape)}) in a "
                            "single step: a module's backward pass ran in separate pieces. Turn "
                            f"{SETTING} off for this run.")
        self._stepped.add(id(p))
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        # the optimizer sees one group holding this one tensor: its state stays keyed by the tensor, so
        # the state dict, the schedule (which sets each group's lr) and resume are those of a normal run
        groups: List[dict] = self.optimizer.param_groups
        group = groups[index]
        params = group["params"]
        group["params"] = [p]
        self.optimizer.param_groups = [group]
        try:
            self.optimizer.step()
        finally:
            group["params"] = params
            self.optimizer.param_groups = groups
        p.grad = None

    @contextlib.contextmanager
    def armed(self):
        """The backward passes inside update the weights; outside (calibration, checks) gradients stay."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False
            self._stepped.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
