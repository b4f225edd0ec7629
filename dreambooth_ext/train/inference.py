"""Images from a pipeline whose modules live in mixed dtypes: a fp32 trained UNet beside half-precision frozen parts.

    images = generate_images(pipe, placement.autocast, prompt=..., num_inference_steps=..., ...)

The denoising loop runs under autocast (the pipeline alone takes the latents' dtype from the prompt
embeddings, so half latents would meet a fp32 UNet); the latents are then cast to the VAE's own
dtype and decoded outside autocast, so a fp32 VAE kept for fp16 runs really decodes in fp32.
"""

import contextlib
from typing import Callable, ContextManager, List, Optional

import torch

AutocastFactory = Callable[[], ContextManager]


def generate_images(pipe, autocast: Optional[AutocastFactory] = None, **call) -> List:
    """PIL images for one pipeline call (any arguments but output_type)."""
    autocast = autocast or contextlib.nullcontext
    with torch.no_grad():
        with autocast():
            latents = pipe(**call, output_type="latent").images
        return decode_latents(pipe, latents)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> List:
    vae = pipe.vae
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype)
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # VAEs with per-channel latent statistics
        shape = (1, latents.shape[1], 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")
