"""A run whose numbers blow up stops at once: no model and no state is ever saved from NaN weights."""

import math


from dreambooth_ext.bridge.components import text_encoder_name
from dreambooth_ext.bridge.to_diffusers import all_finite
from dreambooth_ext.errors import UserError


class NonFiniteWeights(UserError):
    """Trained weights that must not be saved; never retried as a full disk would be."""


def non_finite_message(cfg, step: int, loss: float, precision: str = "fp16") -> str:
    """precision: the mixed precision the run uses (no, fp16, bf16)."""
    what = "NaN" if math.isnan(loss) else "infinite"
    fp16 = " fp16 overflow (set mixed precision to bf16 or no)," if precision == "fp16" else ""
    return (f"The loss became {what} at step {step}, so training stopped: likely causes are a learning rate too high "
            f"({cfg.unet_learning_rate:g}; lower it),{fp16} or a base model with broken weights. No model was written "
            "from these weights, and the last saved state (if any) is kept.")


def check_finite_weights(cfg, trainables, step: int) -> None:
    """Refuse to save trained weights that hold NaN or infinite values."""
    for p in trainables.parameters():
        if p.is_floating_point() and not all_finite(p.detach()):
            raise NonFiniteWeights(f"The trained weights of '{cfg.name}' hold NaN or infinite values at step {step}, "
                            "so nothing was saved from them: lower the learning rate, or set mixed precision "
                            "to bf16 or no; the last saved state (if any) is kept.")


def check_finite_base(bundle, folder) -> None:
    """A diffusers folder is not converted, so its weights are checked here, once, as they are loaded."""
    for label, module in [("unet", bundle.unet), ("vae", bundle.vae)] + [
            (text_encoder_name(i), te) for i, te in enumerate(bundle.text_encoders)]:
        for name, p in module.state_dict().items():
            if p.is_floating_point() and not all_finite(p):
                raise UserError(f"The base model {folder} holds NaN or infinite values ({label}: {name}); it is broken "
                                "and cannot be trained: download it again or pick another one.")
