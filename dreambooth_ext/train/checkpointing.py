"""Gradient checkpointing for the text encoders: each encoder layer recomputed in the backward pass.

transformers' own switch (`gradient_checkpointing_enable`) uses torch's reentrant checkpoint in both
pinned versions (4.30 cannot be told otherwise). That variant runs a separate backward pass inside
each checkpointed layer, so a layer called twice in a step (instance and class prompts, or the
chunks of a long prompt) gets its gradient in two pieces: a per-tensor gradient hook (the fused
backward pass) then fires twice and steps twice, and data-parallel training (DDP) stops with
"Expected to mark a variable ready only once". It also drops the gradients of a layer whose inputs
need none. The non-reentrant variant used here keeps one backward pass, as diffusers' UNet
blocks do, and leaves the state-dict keys unchanged.

Autocast keeps the half-precision copy it makes of every fp32 weight that trains until the outermost
autocast block ends (accelerate wraps a prepared model's forward in one with its cache on). Without
checkpointing the backward pass holds those copies anyway; with it nothing else does, yet the cache
still holds a half copy of the whole trained model at the end of the forward pass (1.6 GiB for a full
SD1.5 UNet, 4.8 GiB for SDXL's). `release_cast_copies` drops each layer's copies once the layer is done.
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


def _clear_cast_cache(_module, _inputs, _output):
    # The copies the graph needs are referenced by it; the rest go now. torch keeps one cache for the whole
    # process, so another thread's cached copies go too and are remade when next used: that costs time,
    # never values (the cache holds only casts of fp32 weights that require gradients).
    torch.clear_autocast_cache()


def release_cast_copies(model: torch.nn.Module) -> list:
    """After each layer that holds trained weights, drop autocast's cached half-precision copies of them.

    For checkpointed models trained in full under mixed precision: each copy is remade when the layer
    runs again (in the backward pass's recompute, or the next denoising step of a sample), which costs
    one cast of the weights. A layer run once a step gets the same gradients. A layer run twice in one
    forward block (a text encoder's instance and class prompts) used one shared copy, whose two gradients
    added in half precision; with its own copy per call they add in fp32. Returns the hook handles.
    """
    handles = []
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(_clear_cast_cache))
    return handles
