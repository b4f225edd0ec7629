"""The optimizer step inside the backward pass: the same weights as a normal step, gradients never all alive."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config_checks import validate
from dreambooth_ext.train.fused_backward import FusedBackward, refusal
from dreambooth_ext.train.optim import make_lr_scheduler, make_optimizer
from dreambooth_ext.train.placement import EMULATE_ENV
from dreambooth_ext.train.run import train
from tests.recording import RecordingReporter
from tests.trainer_helpers import small_config


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 4))


def _optimizer(name, model):
    groups = [{"params": list(model[0].parameters()), "lr": 1e-2}, {"params": list(model[2:].parameters()), "lr": 3e-3}]
    opt = make_optimizer(name, groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, device="cpu")
    return opt, make_lr_scheduler("cosine", opt, warmup_steps=2, total_steps=6, num_cycles=1, power=1.0)


def _grads_alive(model, seen):
    """Hooks (registered before the fused ones, so they run first) counting live gradients as each completes."""
    params = list(model.parameters())
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: seen.append(sum(q.grad is not None for q in params)))


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_steps_match_a_normal_step_exactly_and_gradients_never_pile_up(name):
    normal, fused_model = _model(), _model()
    opt_a, sched_a = _optimizer(name, normal)
    opt_b, sched_b = _optimizer(name, fused_model)
    alive_normal, alive_fused = [], []
    _grads_alive(normal, alive_normal)
    _grads_alive(fused_model, alive_fused)
    fused = FusedBackward(opt_b)
    for step in range(6):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        normal(x).pow(2).mean().backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        sched_a.step()
        with fused.armed():
            fused_model(x).pow(2).mean().backward()
        sched_b.step()
        assert all(p.grad is None for p in fused_model.parameters())
    for a, b in zip(normal.parameters(), fused_model.parameters()):
        assert torch.equal(a, b)
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]  # the schedule reached both the same way
    assert state_a["state"].keys() == state_b["state"].keys()
    n = len(list(normal.parameters()))
    assert max(alive_normal) == n and max(alive_fused) == 1  # the memory saved: n-1 gradients never held


def test_clipping_is_per_tensor():
    normal, fused_model = _model(), _model()
    opt_a, _ = _optimizer("adamw", normal)
    opt_b, _ = _optimizer("adamw", fused_model)
    fused = FusedBackward(opt_b, max_grad_norm=1e-3)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    normal(x).pow(2).mean().backward()
    for p in normal.parameters():
        torch.nn.utils.clip_grad_norm_([p], 1e-3)
    opt_a.step()
    with fused.armed():
        fused_model(x).pow(2).mean().backward()
    for a, b in zip(normal.parameters(), fused_model.parameters()):
        assert torch.equal(a, b)


def test_unarmed_backward_keeps_gradients_and_weights_and_remove_unhooks():
    model = _model()
    opt, _ = _optimizer("adamw", model)
    fused = FusedBackward(opt)
    before = copy.deepcopy(model.state_dict())
    model(torch.ones(2, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fused.remove()
    model.zero_grad(set_to_none=True)
    with fused.armed():
        model(torch.ones(2, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("settings,words", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps is 2"),
    ({"mixed_precision": "fp16"}, "fp16"),
    ({"optimizer": "prodigy"}, "Prodigy"),
])
def test_settings_it_cannot_run_with_are_refused_before_any_work(settings, words, tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), fused_backward_pass=True, **settings)
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert words in str(e.value) and "fused_backward_pass" in str(e.value)
    assert not (tmp_path / "models").exists()


def test_several_processes_are_refused():
    why = refusal(accumulation=1, mixed_precision="bf16", optimizer="adamw", processes=2)
    assert "2 processes" in why
    assert refusal(accumulation=1, mixed_precision="bf16", optimizer="adamw8bit") == ""


RUNS = [
    ("full", "full", "", {}),
    ("full", "frozen", "bf16", {}),
    # the recommendations' pairing: checkpointing recomputes activations inside the backward pass
    ("full", "full", "bf16", {"gradient_checkpointing": True, "optimizer": "adafactor"}),
    ("lora", "lora", "bf16", {"learning_rate": 1e-3, "text_encoder_lora_lr": 1e-3}),
]


@pytest.mark.parametrize("train_mode,te_mode,emulate,extra", RUNS,
                         ids=[f"{m}-te_{t}-{e or 'fp32'}" for m, t, e, _ in RUNS])
def test_a_training_run_writes_the_same_file_as_without_it(train_mode, te_mode, emulate, extra, tiny_checkpoints,
                                                          tmp_path, monkeypatch):
    if emulate:
        monkeypatch.setenv(EMULATE_ENV, emulate)
    updates = []
    real_step = FusedBackward._step_one
    monkeypatch.setattr(FusedBackward, "_step_one", lambda self, i, p: (updates.append(p), real_step(self, i, p)))
    written = []
    for fused in (False, True):
        cfg = small_config(tmp_path / str(fused), tiny_checkpoints("sd1"), train_mode=train_mode,
                           text_encoder_mode=te_mode, text_encoder_lr=1e-4, max_steps=4, max_grad_norm=0.0,
                           fused_backward_pass=fused, **extra)
        result = train(cfg, RecordingReporter())
        assert result.status == "finished"
        assert bool(updates) == fused  # the fused run's weights changed inside its backward passes
        written.append({p.name: load_file(p) for p in map(Path, result.outputs)})
    assert written[0].keys() == written[1].keys() and written[0]
    for name, plain in written[0].items():
        fused = written[1][name]
        assert plain.keys() == fused.keys()
        for key in plain:
            assert torch.equal(plain[key], fused[key]), (name, key)
    if train_mode == "full":  # the steps moved the weights away from the base
        base = load_file(str(tiny_checkpoints("sd1")))
        plain = next(iter(written[0].values()))
        assert any(not torch.equal(base[k].to(v.dtype), v) for k, v in plain.items() if k in base)


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_checkpoints, tmp_path):
    def run(folder, stop=None):
        cfg = small_config(folder, tiny_checkpoints("sd1"), train_mode="full", max_steps=4, max_grad_norm=1.0,
                           fused_backward_pass=True)
        return train(cfg, RecordingReporter(stop_at_step=stop))

    whole = run(tmp_path / "whole")
    assert run(tmp_path / "parts", stop=2).status == "cancelled"
    resumed = run(tmp_path / "parts")
    assert resumed.status == "finished" and resumed.step == 4
    a, b = load_file(sorted(whole.outputs)[-1]), load_file(sorted(resumed.outputs)[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
