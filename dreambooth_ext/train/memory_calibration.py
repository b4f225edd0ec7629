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


def measure_text_encoder_activation_bytes(encoders, prompts: int = 2, *, checkpointed: bool, seed: int = 0) -> int:
    """Peak bytes of a text-encoder LoRA step's forward and backward (each of `prompts` 77-token prompts in a
    call of its own, as the trainer encodes the instance and class prompts), beyond the adapters' gradients.

    The encoders get frozen bf16 weights and fp32 adapters on attention, in place; bf16 autocast."""
    from dreambooth_ext.train import lora as lora_lib
    from dreambooth_ext.train.checkpointing import checkpoint_text_encoder

    for te in encoders:
        te.to(torch.bfloat16).requires_grad_(False)
        if not lora_lib.lora_layers(te):
            lora_lib.add_lora(te, "attention", 4, 4.0, is_text_encoder=True)
        lora_lib.cast_lora_parameters(te, torch.float32)
        te.train()
        if checkpointed:
            checkpoint_text_encoder(te)
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, te.config.vocab_size, (1, 77), generator=gen) for te in encoders]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(te(i, output_hidden_states=True).hidden_states[-2].float().mean()
                       for _ in range(prompts) for te, i in zip(encoders, ids))
        loss.backward()

    step()  # the adapters' gradients exist before measuring
    adapters = sum(p.numel() * 4 for te in encoders for p in lora_lib.lora_parameters(te))
    for te in encoders:
        te.zero_grad(set_to_none=True)
    return max(0, peak_allocated_bytes(step) - adapters)
