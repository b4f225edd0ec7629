"""Optimizers, LR schedules, mixed precision, loss scaling, EMA and attention choice, on the CPU."""

import io
import sys
import types

import pytest
import torch

from dreambooth_ext.errors import UserError
from dreambooth_ext.train import optim, precision
from dreambooth_ext.train.ema import EMA
from dreambooth_ext.train.optim import make_lr_scheduler, make_optimizer, optimizer_available
from dreambooth_ext.train.precision import choose_attention, resolve_mixed_precision, trainable_dtype

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here allocates on it
ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1), x, y


def _train(model, opt, x, y, steps, sched=None):
    losses, lrs = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses, lrs


def _curve(name, total, warmup=0, cycles=1, power=1.0, steps=None):
    """Multipliers used at optimizer steps 0..steps-1 (base LR 1)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(name, opt, warmup_steps=warmup, total_steps=total, num_cycles=cycles, power=power)
    out = []
    for _ in range(total if steps is None else steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# ---------------------------------------------------------------------------------------------
# LR schedules

def test_constant_ignores_warmup():
    assert _curve("constant", 10, warmup=5) == [1.0] * 10


def test_warmup_ramps_linearly_from_near_zero():
    lrs = _curve("constant_with_warmup", 12, warmup=4)
    assert lrs[0] == pytest.approx(0.2)  # moves from the first step, no step wasted at 0
    steps = [b - a for a, b in zip(lrs[:5], lrs[1:5])]
    assert steps == pytest.approx([0.2] * 4)
    assert lrs[4:] == [1.0] * 8
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        assert _curve(name, 12, warmup=4)[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]), name


def test_linear_decays_to_zero():
    lrs = _curve("linear", 10, steps=11)
    assert lrs[:10] == pytest.approx([1 - i / 10 for i in range(10)])
    assert lrs[10] == 0.0


def test_cosine_halfway_and_end():
    lrs = _curve("cosine", 22, warmup=2, steps=23)
    assert lrs[2] == 1.0 and lrs[12] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert 0 < lrs[21] < 0.01 and lrs[22] == pytest.approx(0.0)


def test_cosine_with_restarts_restarts():
    lrs = _curve("cosine_with_restarts", 20, cycles=2, steps=21)
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(0.5) and lrs[9] < 0.05
    assert lrs[10] == pytest.approx(1.0)  # second cycle starts again at full LR
    assert lrs[15] == pytest.approx(0.5) and lrs[19] < 0.05 and lrs[20] == 0.0
    one = _curve("cosine_with_restarts", 20, cycles=1)
    assert one == pytest.approx(_curve("cosine", 20))


def test_polynomial_power_one_is_linear():
    assert _curve("polynomial", 15, warmup=3, power=1.0) == pytest.approx(_curve("linear", 15, warmup=3))
    quad = _curve("polynomial", 10, power=2.0)
    assert quad == pytest.approx([(1 - i / 10) ** 2 for i in range(10)])


def test_scheduler_refuses_bad_settings():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="lr_scheduler"):
        make_lr_scheduler("cosine_annealing", opt, warmup_steps=0, total_steps=10)
    with pytest.raises(UserError, match="max_steps"):
        make_lr_scheduler("linear", opt, warmup_steps=0, total_steps=0)


def test_scheduler_scales_each_group_from_its_own_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer("adamw", [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-4}], device=CPU, **ADAM)
    sched = make_lr_scheduler("linear", opt, warmup_steps=0, total_steps=4)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.75e-3, 0.75e-4])


# ---------------------------------------------------------------------------------------------
# Resume: optimizer and scheduler state

def _roundtrip(obj_state):
    buf = io.BytesIO()
    torch.save(obj_state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_state_dict_round_trip_continues_identically(name):
    model, x, y = _regression()
    opt = make_optimizer(name, [{"params": model.parameters(), "lr": 1e-2}], device=CPU, **ADAM)
    sched = make_lr_scheduler("cosine_with_restarts", opt, warmup_steps=3, total_steps=12, num_cycles=2)
    _train(model, opt, x, y, 5, sched)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    _, lrs_a = _train(model, opt, x, y, 7, sched)

    resumed, _, _ = _regression(seed=1)  # other initial weights: everything must come from the state
    resumed.load_state_dict(saved["model"])
    opt2 = make_optimizer(name, [{"params": resumed.parameters(), "lr": 1e-2}], device=CPU, **ADAM)
    sched2 = make_lr_scheduler("cosine_with_restarts", opt2, warmup_steps=3, total_steps=12, num_cycles=2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    _, lrs_b = _train(resumed, opt2, x, y, 7, sched2)
    assert lrs_a == lrs_b
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_resume_with_more_steps_follows_the_new_settings():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler("linear", opt, warmup_steps=0, total_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    state = _roundtrip(sched.state_dict())
    longer = make_lr_scheduler("linear", opt, warmup_steps=0, total_steps=20)
    longer.load_state_dict(state)
    opt.step()
    longer.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 - 5 / 20)


# ---------------------------------------------------------------------------------------------
# Optimizers

def test_adamw_is_fused_on_the_cpu_where_torch_can_and_trains_a_linear_regression():
    model, x, y = _regression()
    opt = make_optimizer("adamw", [{"params": model.parameters(), "lr": 5e-2}], device=CPU, **ADAM)
    cpu_fuses = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    assert isinstance(opt, torch.optim.AdamW) and bool(opt.defaults.get("fused")) == cpu_fuses
    losses, _ = _train(model, opt, x, y, 200)
    assert losses[-1] < 0.01 * losses[0]


class _NoFusedCpuAdamW(torch.optim.AdamW):
    """torch 2.1's AdamW (the WebUI's): fused=True is accepted for CUDA parameters only, refused when built."""

    def __init__(self, params, *args, fused=None, **kwargs):
        params = list(params)
        if fused and not all(p.is_cuda for g in params for p in g["params"]):
            raise RuntimeError("`fused=True` requires all the params to be CUDA, floating point Tensors")
        super().__init__(params, *args, fused=fused, **kwargs)


def test_adamw_falls_back_where_torch_has_no_fused_cpu_kernel_and_matches_the_fused_one(monkeypatch):
    fused_model, x, y = _regression()
    fused = make_optimizer("adamw", [{"params": fused_model.parameters(), "lr": 5e-2}], device=CPU, **ADAM)
    monkeypatch.setattr(torch.optim, "AdamW", _NoFusedCpuAdamW)
    model, _, _ = _regression()
    opt = make_optimizer("adamw", [{"params": model.parameters(), "lr": 5e-2}], device=CPU, **ADAM)
    assert isinstance(opt, _NoFusedCpuAdamW) and not opt.defaults.get("fused")
    losses, _ = _train(model, opt, x, y, 200)
    fused_losses, _ = _train(fused_model, fused, x, y, 200)
    assert losses[-1] < 0.01 * losses[0]
    for p, q in zip(model.parameters(), fused_model.parameters()):  # the same update, to float rounding
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)


def test_adafactor_trains_on_cpu():
    from transformers.optimization import Adafactor

    model, x, y = _regression()
    opt = make_optimizer("adafactor", [{"params": model.parameters(), "lr": 5e-2}], device=CPU,
                         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert isinstance(opt, Adafactor) and opt.param_groups[0]["lr"] == 5e-2
    assert not opt.defaults["relative_step"] and not opt.defaults["scale_parameter"]
    losses, _ = _train(model, opt, x, y, 200)
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_refused_on_cpu_with_one_line(name, monkeypatch):
    p = torch.nn.Parameter(torch.zeros(3))
    for bnb in (None, types.ModuleType("bitsandbytes")):  # missing, and (pretend) installed: the CPU refuses both
        monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
        with pytest.raises(UserError) as err:
            make_optimizer(name, [{"params": [p], "lr": 1e-4}], device=CPU, **ADAM)
        msg = str(err.value)
        assert "\n" not in msg and "'optimizer'" in msg and "bitsandbytes on an NVIDIA GPU" in msg
        assert "choose adamw or adafactor" in msg
        assert optimizer_available(name, CPU)[0] is False


def test_8bit_needs_bitsandbytes_on_cuda_and_uses_it_when_there(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    ok, why = optimizer_available("adamw8bit", CUDA)
    assert not ok and "bitsandbytes does not import" in why

    made = {}
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(
        AdamW8bit=lambda groups, **kw: made.update(cls="AdamW8bit", groups=groups, **kw) or "adam",
        Lion8bit=lambda groups, **kw: made.update(cls="Lion8bit", groups=groups, **kw) or "lion")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    assert optimizer_available("lion8bit", CUDA) == (True, "")
    p = torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [p], "lr": 1e-4}]
    assert make_optimizer("adamw8bit", groups, device=CUDA, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1) == "adam"
    assert made["eps"] == 1e-6 and made["betas"] == (0.9, 0.99) and made["groups"][0]["lr"] == 1e-4
    made.clear()
    assert make_optimizer("lion8bit", groups, device=CUDA, **ADAM) == "lion"
    assert made["cls"] == "Lion8bit" and "eps" not in made


def test_prodigy_missing_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UserError) as err:
        make_optimizer("prodigy", [{"params": [p], "lr": 1.0}], device=CPU, **ADAM)
    assert "pip install prodigyopt" in str(err.value) and "\n" not in str(err.value)
    assert optimizer_available("prodigy", CPU)[0] is False


def test_prodigy_used_when_installed(monkeypatch):
    fake = types.ModuleType("prodigyopt")

    class Prodigy(torch.optim.SGD):
        def __init__(self, params, betas, eps, weight_decay, **kw):
            self.kw = kw
            super().__init__(params, lr=1.0)

    fake.Prodigy = Prodigy
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("prodigy", [{"params": [p], "lr": 1.0}], device=CPU, **ADAM)
    assert isinstance(opt, Prodigy) and opt.kw["decouple"] is True


def test_unknown_optimizer_is_a_user_error():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(UserError, match="'optimizer'"):
        make_optimizer("sgd", [{"params": [p], "lr": 1.0}], device=CPU, **ADAM)
    assert optimizer_available("sgd", CPU)[0] is False
    assert optimizer_available("adamw", CPU) == (True, "") and optimizer_available("adafactor", CPU) == (True, "")


# ---------------------------------------------------------------------------------------------
# Mixed precision and loss scaling

def test_resolve_mixed_precision_on_cpu():
    assert resolve_mixed_precision("auto", CPU) == ("no", [])
    assert resolve_mixed_precision("no", CPU) == ("no", [])
    assert resolve_mixed_precision("bf16", CPU) == ("bf16", [])
    mode, notes = resolve_mixed_precision("fp16", CPU)
    assert mode == "no" and len(notes) == 1 and "fp16" in notes[0]
    with pytest.raises(UserError, match="mixed_precision"):
        resolve_mixed_precision("fp8", CPU)


@pytest.mark.parametrize("native", [True, False])
def test_resolve_mixed_precision_on_cuda(native, monkeypatch):
    monkeypatch.setattr(precision, "_native_bf16", lambda: native)
    assert resolve_mixed_precision("auto", CUDA) == ("bf16" if native else "fp16", [])
    assert resolve_mixed_precision("fp16", CUDA) == ("fp16", [])
    mode, notes = resolve_mixed_precision("bf16", CUDA)
    assert (mode, len(notes)) == (("bf16", 0) if native else ("fp16", 1))


def test_trainable_dtype():
    assert trainable_dtype("bf16", CPU) == torch.float32
    assert trainable_dtype("fp16", CUDA) == torch.float16
    assert trainable_dtype("bf16", CUDA, module="vae") == torch.bfloat16
    assert trainable_dtype("fp16", CUDA, module="vae") == torch.float32  # fp16 SD VAEs overflow
    assert trainable_dtype("fp16", CUDA, trained=True) == torch.float32
    assert trainable_dtype("no", CUDA) == torch.float32


def test_ema_matches_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    ema.update([p], step=0)  # d = min(0.5, 1/10) = 0.1
    assert ema.shadow[0].tolist() == pytest.approx([0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * 6])
    with torch.no_grad():
        p.copy_(torch.tensor([0.0, 0.0]))
    ema.update([p], step=10)  # d = min(0.5, 11/20) = 0.5
    assert ema.shadow[0].tolist() == pytest.approx([0.5 * 2.8, 0.5 * 5.6])
    assert ema.decay_at(10_000) == 0.5


def test_ema_store_copy_restore_and_state():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16))
    ema = EMA([p], decay=0.9)
    assert ema.shadow[0].dtype == torch.float32
    with torch.no_grad():
        p.add_(1.0)
    ema.update([p], step=100)
    live = p.detach().clone()
    ema.store([p])
    ema.copy_to([p])
    assert torch.equal(p.detach(), ema.shadow[0].half())
    ema.restore([p])
    assert torch.equal(p.detach(), live)
    with pytest.raises(RuntimeError):
        ema.restore([p])

    other = EMA([torch.zeros(2)], decay=0.9)
    other.load_state_dict(_roundtrip(ema.state_dict()))
    assert torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(UserError, match="use_ema"):
        EMA([torch.zeros(3)], decay=0.9).load_state_dict(ema.state_dict())


# ---------------------------------------------------------------------------------------------
# Attention

@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=32, sample_size=16).eval()


def _processors(unet):
    return {type(p).__name__ for p in unet.attn_processors.values()}


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=ctx).sample


def test_choose_attention_on_cpu(tiny_unet):
    assert choose_attention("default", CPU, tiny_unet) == "default"
    assert _processors(tiny_unet) == {"AttnProcessor"}
    classic = _unet_out(tiny_unet)
    assert choose_attention("auto", CPU, tiny_unet) == "sdpa"
    assert _processors(tiny_unet) == {"AttnProcessor2_0"}
    assert torch.allclose(_unet_out(tiny_unet), classic, atol=1e-5)
    assert choose_attention("sdpa", CPU, tiny_unet) == "sdpa"
    with pytest.raises(UserError) as err:
        choose_attention("xformers", CPU, tiny_unet)
    assert "'attention'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError):
        choose_attention("flash", CPU, tiny_unet)


def test_auto_attention_falls_back_to_sdpa_when_xformers_fails(tiny_unet, monkeypatch):
    notes = []
    monkeypatch.setattr(precision, "_xformers_importable", lambda: (True, ""))

    def broken():
        raise RuntimeError("No operator found for memory_efficient_attention_forward")

    monkeypatch.setattr(tiny_unet, "enable_xformers_memory_efficient_attention", broken)
    assert choose_attention("auto", CUDA, tiny_unet, warn=notes.append) == "sdpa"
    assert len(notes) == 1 and "No operator found" in notes[0]
    with pytest.raises(UserError, match="No operator found"):
        choose_attention("xformers", CUDA, tiny_unet)
    monkeypatch.setattr(precision, "_xformers_importable", lambda: (False, "No module named 'xformers'"))
    assert choose_attention("auto", CUDA, tiny_unet, warn=notes.append) == "sdpa" and len(notes) == 1
