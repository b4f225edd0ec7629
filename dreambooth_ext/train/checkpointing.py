"""Gradient checkpointing for the text encoders: each encoder layer recomputed in the backward pass.

transformers' own switch (`gradient_checkpointing_enable`) uses torch's reentrant checkpoint in both
pinned versions (4.30 cannot be told otherwise). That variant runs a separate backward pass inside
each checkpointed layer, so a layer called twice in a step (instance and class prompts, or the
chunks of a long prompt) gets its gradient in two pieces: a per-tensor gradient hook (the fused
backward pass) then fires twice and steps twice, and data-parallel training (DDP) stops with
"Expected to mark a variable ready only once". It also drops the gradients of a layer whose inputs
need none. The non-reentrant variant used here keeps one backward pass, as diffusers' UNet
blocks do, and leaves the state-dict keys unchanged.
"""

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _recomputed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)  # inference (samples, class images): nothing to recompute


def checkpoint_text_encoder(text_encoder: torch.nn.Module) -> int:
    """Recompute every encoder layer of a CLIP text encoder in the backward pass; returns how many layers.

    The layer's `forward` is wrapped on the instance, so hooks, adapters and the keys stay as they are.
    """
    count = 0
    for module in text_encoder.modules():
        layers = getattr(module, "layers", None)
        if hasattr(module, "gradient_checkpointing") and isinstance(layers, torch.nn.ModuleList):
            module.gradient_checkpointing = False  # never the reentrant path as well
            for layer in layers:
                if getattr(layer.forward, "func", None) is not _recomputed:  # not wrapped twice
                    layer.forward = functools.partial(_recomputed, layer.forward)
                count += 1
    if not count:
        raise ValueError(f"{type(text_encoder).__name__} has no encoder layers to checkpoint")
    return count
