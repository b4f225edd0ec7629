"""Text-encoder checkpointing: the same gradients in one backward pass, less kept for it, keys unchanged."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.checkpointing import checkpoint_text_encoder
from dreambooth_ext.train.fused_backward import FusedBackward


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
