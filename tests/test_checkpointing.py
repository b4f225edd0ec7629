"""Text-encoder checkpointing: the same gradients in one backward pass, less kept for it, keys unchanged.
Autocast's half copies of trained weights: released layer by layer under checkpointing, values unchanged."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.checkpointing import checkpoint_text_encoder, release_cast_copies
from dreambooth_ext.train.fused_backward import FusedBackward
from dreambooth_ext.train.placement import EMULATE_ENV
from dreambooth_ext.train.run import train
from tests.recording import RecordingReporter
from tests.trainer_helpers import capture_bundles, small_config


def _encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=16)
    return CLIPTextModel(config).train()


def _two_calls(te):
    """Two prompts encoded in separate calls, as the trainer does for instance and class prompts."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
        a = te(torch.tensor([[1, 5, 7, 2]])).last_hidden_state
        b = te(torch.tensor([[1, 9, 2, 2]])).last_hidden_state
    loss = (a.square().mean() + b.sin().mean())
    loss.backward()
    return {n: p.grad.clone() for n, p in te.named_parameters()}, sum(saved)


def test_same_gradients_fewer_saved_values_one_gradient_per_tensor_and_the_same_keys():
    plain = _encoder()
    grads, saved = _two_calls(plain)
    te = _encoder()
    keys = list(te.state_dict())
    assert checkpoint_text_encoder(te) == 3
    assert list(te.state_dict()) == keys
    hits = {}
    for name, p in te.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: hits.__setitem__(name, hits.get(name, 0) + 1))
    grads_ck, saved_ck = _two_calls(te)
    assert set(hits.values()) == {1} and len(hits) == len(grads)  # each gradient arrives whole, once
    for name in grads:
        assert torch.equal(grads[name], grads_ck[name]), name
    assert saved_ck < 0.6 * saved  # the layers' activations are recomputed, not kept
    with torch.no_grad():  # inference through the wrapped layers
        assert torch.equal(plain(torch.tensor([[1, 5, 7, 2]])).last_hidden_state,
                           te(torch.tensor([[1, 5, 7, 2]])).last_hidden_state)


def test_twice_is_the_same_as_once_and_a_model_without_layers_is_refused():
    te = _encoder()
    checkpoint_text_encoder(te)
    layer = te.text_model.encoder.layers[0]
    wrapped = layer.forward
    checkpoint_text_encoder(te)
    assert layer.forward is wrapped
    with pytest.raises(ValueError):
        checkpoint_text_encoder(torch.nn.Linear(2, 2))


def test_a_gradient_in_two_pieces_stops_the_fused_pass_with_one_sentence():
    # reentrant checkpointing (transformers' own) hands a shared layer its gradient once per call
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    fused = FusedBackward(opt)
    x = torch.randn(2, 4, requires_grad=True)
    loss = sum(checkpoint(layer, x * k, use_reentrant=True).sum() for k in (1.0, 2.0))
    with pytest.raises(UserError) as err, fused.armed():
        loss.backward()
    assert "fused_backward_pass" in str(err.value) and str(err.value).count(". ") <= 2


class _CastCopies(TorchDispatchMode):
    """Weak references to every bf16 copy made of one of `params`: which of them are still alive."""

    def __init__(self, params):
        super().__init__()
        self.sources, self.copies = {p.data_ptr() for p in params}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.sources \
                and out.dtype == torch.bfloat16:
            self.copies.append(weakref.ref(out))
        return out

    def alive(self) -> int:
        return sum(r() is not None for r in self.copies)


def _checkpointed_step(release: bool):
    """A checkpointed model whose forward accelerate has wrapped in autocast (its cache on), called inside the
    trainer's own autocast block; returns the half copies alive as the forward ends, and the gradients."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(6))
    if release:
        assert len(release_cast_copies(layers)) == 6

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def forward(x):
        for layer in layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x

    tracker = _CastCopies(list(layers.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with tracker:
            out = forward(torch.randn(3, 16))
            alive = tracker.alive()
        loss = out.float().square().mean()
    loss.backward()
    return alive, [p.grad for p in layers.parameters()]


def test_half_copies_of_trained_weights_do_not_outlive_their_layer_and_change_no_gradient():
    kept, grads = _checkpointed_step(release=False)
    released, grads_released = _checkpointed_step(release=True)
    assert kept == 12  # every weight and bias of the six layers, held by the cache alone
    assert released == 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_released))


@pytest.mark.parametrize("family,te_mode", [("sd1", "frozen"), ("sdxl", "full")])
def test_a_checkpointed_full_run_in_the_gpu_layout_releases_the_copies_and_trains_the_same(
        family, te_mode, tiny_checkpoints, tmp_path, monkeypatch):
    """The UNet runs once a step, so its steps are bit-identical with the copies released. A text encoder runs
    twice (instance and class prompts): released, its two gradients add in fp32 rather than in bf16."""
    import dreambooth_ext.train.run as run_module
    from safetensors.torch import load_file

    monkeypatch.setenv(EMULATE_ENV, "bf16")
    released = []
    real = run_module.release_cast_copies
    written = []
    for release in (False, True):
        monkeypatch.setattr(run_module, "release_cast_copies",
                            lambda model: released.append(type(model).__name__) or real(model) if release else [])
        cfg = small_config(tmp_path / str(release), tiny_checkpoints(family), train_mode="full",
                           text_encoder_mode=te_mode, text_encoder_lr=1e-4, gradient_checkpointing=True, max_steps=2,
                           sample_every=2)
        result = train(cfg, RecordingReporter())
        assert result.status == "finished"
        written.append(load_file(sorted(result.outputs)[-1]))
    encoders = {"sd1": ["CLIPTextModel"], "sdxl": ["CLIPTextModel", "CLIPTextModelWithProjection"]}[family]
    assert sorted(released) == sorted(["UNet2DConditionModel"] + (encoders if te_mode == "full" else []))
    assert written[0].keys() == written[1].keys()
    for k in written[0]:
        if te_mode == "frozen":
            assert torch.equal(written[0][k], written[1][k]), k
        else:
            assert torch.allclose(written[0][k], written[1][k], rtol=0, atol=1e-5), k


def test_text_encoder_adapters_train_through_checkpointed_layers_to_the_same_file(tiny_checkpoints, tmp_path,
                                                                                  monkeypatch):
    """LoRA on the text encoder: its layers are recomputed in the backward pass (fp32: the same steps)."""
    from safetensors.torch import load_file

    from dreambooth_ext.train.checkpointing import _recomputed

    written = []
    for gc in (False, True):
        bundles = capture_bundles(monkeypatch)
        cfg = small_config(tmp_path / str(gc), tiny_checkpoints("sd1"), train_mode="lora", text_encoder_mode="lora",
                           gradient_checkpointing=gc, max_steps=3, learning_rate=1e-3, text_encoder_lora_lr=1e-3)
        result = train(cfg, RecordingReporter())
        assert result.status == "finished"
        layers = bundles[-1].text_encoders[0].text_model.encoder.layers
        assert all((getattr(layer.forward, "func", None) is _recomputed) == gc for layer in layers)
        written.append(load_file(sorted(p for p in result.outputs if p.endswith(".safetensors"))[-1]))
    assert written[0].keys() == written[1].keys() and any(k.startswith("lora_te") for k in written[0])
    assert all(torch.equal(written[0][k], written[1][k]) for k in written[0])
