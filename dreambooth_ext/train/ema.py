"""An exponential moving average of the trained weights, saved instead of the last weights when asked.

    ema = EMA(trained_params, cfg.ema_decay)
    ...after each optimizer step: ema.update(trained_params, step)     # step: optimizer steps before this one
    ema.store(trained_params); ema.copy_to(trained_params); sample(); ema.restore(trained_params)

Shadows are fp32 whatever the weights' dtype, so tiny updates (1 - decay ~ 1e-4) are not rounded away.
"""

from typing import Any, Dict, Iterable, List, Optional, Union

import torch

from dreambooth_ext.errors import UserError


class EMA:
    def __init__(self, parameters: Iterable[torch.Tensor], decay: float,
                 device: Optional[Union[str, torch.device]] = None):
        """`device`: where the shadows live; default beside each weight ('cpu' saves GPU memory, costs copies)."""
        self.decay = float(decay)
        self.shadow: List[torch.Tensor] = [
            p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in parameters]
        self._stored: Optional[List[torch.Tensor]] = None

    def decay_at(self, step: int) -> float:
        """Warmup: an average over few steps early on, so the first random-ish weights fade quickly."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor], step: int) -> None:
        """shadow = d * shadow + (1 - d) * weight, with d = decay_at(step)."""
        weight = 1.0 - self.decay_at(step)
        params = list(parameters)
        self._check(params)
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().to(s.device, torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Overwrite the weights with the averages (before saving, or to sample with them)."""
        params = list(parameters)
        self._check(params)
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.device, p.dtype))

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep the live weights aside (on the CPU, so sampling has the GPU memory) until restore()."""
        self._stored = [p.detach().to("cpu", copy=True) for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the weights saved by store()."""
        if self._stored is None:
            raise RuntimeError("EMA.restore() called without store()")
        params = list(parameters)
        for saved, p in zip(self._stored, params):
            p.copy_(saved.to(p.device, p.dtype))
        self._stored = None

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.detach().clone() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the averages; the decay stays the one this EMA was made with (the run's setting)."""
        shadows = state["shadow"]
        if len(shadows) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadows, self.shadow)):
            raise UserError("The saved EMA weights do not match the weights being trained; resume with the same "
                            "model and LoRA settings, or turn use_ema off.")
        for s, saved in zip(self.shadow, shadows):
            s.copy_(saved.to(s.device, torch.float32))

    def _check(self, params: List[torch.Tensor]) -> None:
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors but got {len(params)}")
