"""Every optimizer the config offers either trains here or is refused with its one sentence.

The choices come from the config's own declaration (what the tab, the CLI and the API offer), so a choice the
builder does not know, or one it builds without being able to run it, fails here. Nothing is faked: what the
machine has installed (bitsandbytes, prodigyopt, a CUDA GPU) decides which branch each choice takes.
"""

import pytest
import torch

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import TrainConfig, describe
from dreambooth_ext.train.optim import make_optimizer, optimizer_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where training would run here
OFFERED = next(s for s in describe(TrainConfig) if s.name == "optimizer").choices
ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _fit(opt, weight, steps=30):
    """Loss of a one-weight regression before and after `steps` optimizer steps."""
    target = torch.tensor([2.0, -1.0, 0.5], device=DEVICE)
    losses = []
    for _ in range(steps):
        loss = ((weight - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_the_config_offers_choices():
    assert OFFERED and "adamw" in OFFERED and len(set(OFFERED)) == len(OFFERED)


@pytest.mark.parametrize("name", OFFERED)
def test_each_offered_optimizer_trains_or_is_refused_with_its_sentence(name):
    ok, why = optimizer_available(name, DEVICE)
    weight = torch.nn.Parameter(torch.zeros(3, device=DEVICE))
    groups = [{"params": [weight], "lr": 1.0 if name == "prodigy" else 0.05}]
    if ok:
        assert why == ""
        opt = make_optimizer(name, groups, device=DEVICE, **ADAM)
        assert isinstance(opt, torch.optim.Optimizer)
        first, last = _fit(opt, weight)
        assert last < first  # it moves the weight towards the target
        return
    assert why and "\n" not in why
    with pytest.raises(UserError) as err:
        make_optimizer(name, groups, device=DEVICE, **ADAM)
    msg = str(err.value)
    assert msg.startswith(f"Setting 'optimizer' is {name}") and "\n" not in msg and msg.endswith(".")
    assert why in msg  # the reason the form shows is the reason the run gives
    assert "adamw" in msg.split(why, 1)[1]  # and it names a choice that runs everywhere
    assert torch.equal(weight.detach(), torch.zeros(3, device=DEVICE))  # nothing was trained


def test_a_name_the_config_does_not_offer_is_refused():
    weight = torch.nn.Parameter(torch.zeros(3))
    assert "sgd" not in OFFERED and optimizer_available("sgd", DEVICE)[0] is False
    with pytest.raises(UserError, match="'optimizer'") as err:
        make_optimizer("sgd", [{"params": [weight], "lr": 1.0}], device=DEVICE, **ADAM)
    assert all(choice in str(err.value) for choice in OFFERED)


def test_one_declaration_per_optimizer_feeds_the_config_the_builder_and_the_memory_estimate():
    from dreambooth_ext.train.memory import OPTIMIZER_BYTES
    from dreambooth_ext.train.optim import BUILDERS
    from dreambooth_ext.train.optimizer_kinds import KINDS

    names = tuple(kind.name for kind in KINDS)
    assert tuple(OFFERED) == names  # what the tab, the CLI and the API offer
    assert set(BUILDERS) == set(names)  # each one is built here
    assert set(OPTIMIZER_BYTES) == set(names)  # and its state counted in the memory estimate
    assert all(kind.label and kind.remedy and "adamw" in kind.remedy for kind in KINDS)


def test_the_checks_before_a_run_refuse_with_the_builders_sentence(monkeypatch):
    """precheck and make_optimizer give one sentence for an optimizer that cannot run here."""
    import sys

    from dreambooth_ext.train import precheck, precision

    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    monkeypatch.setattr(precision, "pick_device", lambda prefer=None: torch.device("cpu"))
    cfg = TrainConfig(optimizer="prodigy", attention="sdpa")
    with pytest.raises(UserError) as checked:
        precheck._check_device_settings(cfg)
    weight = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UserError) as built:
        make_optimizer("prodigy", [{"params": [weight], "lr": 1.0}], device="cpu", **ADAM)
    assert str(checked.value) == str(built.value) and "pip install prodigyopt" in str(built.value)
