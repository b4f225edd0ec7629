"""Measured activation memory of a UNet training step on the CPU, to calibrate and check memory.py.

    measured = measure_activation_bytes(unet, latent_side=16, batch=2, checkpointed=False)
    estimated = activation_bytes(unet.config, 16 * 16, 2, checkpointed=False, half=True)

The step is the trainer's LoRA step: frozen bf16 weights, fp32 adapters, bf16 autocast, MSE against
noise, backward. torch's memory profiler records every allocation and free of the step; the peak
of live bytes above what existed before, less the adapters' gradients, is what the backward pass
kept plus its transients. CPU kernels differ from CUDA's in their temporaries, hence the estimator's
stated error.
"""

from typing import Callable

import torch


def peak_allocated_bytes(fn: Callable[[], None]) -> int:
    """Peak of live CPU tensor bytes allocated (beyond those alive before) while fn runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = top = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:  # private, but the only allocation timeline
        if action.name == "CREATE":
            live += nbytes
        elif action.name == "DESTROY":
            live -= nbytes
        top = max(top, live)
    return top


def measure_activation_bytes(unet, latent_side: int, batch: int, *, checkpointed: bool, seed: int = 0) -> int:
    """Peak bytes of one LoRA training step's forward and backward, beyond the weights and adapter gradients."""
    from dreambooth_ext.train import lora as lora_lib

    unet = unet.to(torch.bfloat16)
    if not lora_lib.lora_layers(unet):
        lora_lib.add_lora(unet, "attention", 4, 4.0)
    lora_lib.cast_lora_parameters(unet, torch.float32)
    unet.train()
    if checkpointed:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    latents = torch.randn(batch, cfg.in_channels, latent_side, latent_side, generator=gen).to(torch.bfloat16)
    cond = torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen).to(torch.bfloat16)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=gen).to(torch.bfloat16),
                 "time_ids": torch.tensor([[latent_side * 8] * 2 + [0, 0] + [latent_side * 8] * 2] * batch,
                                          dtype=torch.bfloat16)}
    timesteps = torch.full((batch,), 500)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(latents, timesteps, cond, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(pred.float(), latents.float()).backward()

    step()  # warm-up: lazily made buffers and the adapters' gradients exist before measuring
    adapter_grads = sum(p.numel() * 4 for p in lora_lib.lora_parameters(unet))
    unet.zero_grad(set_to_none=True)
    return max(0, peak_allocated_bytes(step) - adapter_grads)
