"""Loss scaling across a resume: a GradScaler's scale, backed off by an overflow, comes back from the saved state.

The trainer keeps accelerate's GradScaler (fp16 on an NVIDIA GPU) in the run's state beside the optimizer;
torch's GradScaler also runs on the CPU, so its save/load round trip through the state files is checked here.
"""

import pytest
import torch

from dreambooth_ext.train import state as st
from dreambooth_ext.train.optim import make_lr_scheduler, make_optimizer

ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
pytestmark = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch without torch.amp.GradScaler")


def _run(model, opt, sched, scaler, losses, x, y):
    """One scaled step per loss factor; a factor of inf overflows the gradients, so that step is skipped."""
    for factor in losses:
        loss = torch.nn.functional.mse_loss(model(x), y) * factor
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def _setup(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    opt = make_optimizer("adamw", [{"params": model.parameters(), "lr": 1e-2}], device="cpu", **ADAM)
    sched = make_lr_scheduler("linear", opt, warmup_steps=0, total_steps=10)
    return model, opt, sched, torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)


def test_a_backed_off_scale_and_the_weights_continue_after_a_resume(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    model, opt, sched, scaler = _setup(0)
    before = [p.detach().clone() for p in model.parameters()]
    _run(model, opt, sched, scaler, [1.0, float("inf")], x, y)  # the overflow halves the scale, skips the step
    assert scaler.get_scale() == 512.0
    trained = {k: v for k, v in model.state_dict().items()}
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the first step was taken
    st.save_state(tmp_path, trained, opt, sched, scaler, None, st.Progress(step=2))

    resumed, opt2, sched2, scaler2 = _setup(1)  # other weights and a fresh scale: all must come from the state
    weights, rest = st.load_state(tmp_path)
    resumed.load_state_dict(weights)
    opt2.load_state_dict(rest["optimizer"])
    sched2.load_state_dict(rest["lr_scheduler"])
    scaler2.load_state_dict(rest["scaler"])
    assert scaler2.get_scale() == 512.0 and rest["ema"] is None

    _run(model, opt, sched, scaler, [1.0, 1.0, 1.0], x, y)  # two clean steps in a row: the scale grows again
    _run(resumed, opt2, sched2, scaler2, [1.0, 1.0, 1.0], x, y)
    assert scaler.get_scale() == scaler2.get_scale() == 1024.0
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
