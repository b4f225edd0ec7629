"""Measuring what training did, in latent space: how close generations come to the instance images.

Used by the tests (a learned token, prior preservation), the demo and the benchmarks.
"""

from pathlib import Path
from typing import Sequence

import torch


@torch.no_grad()
def image_latents(bundle, paths: Sequence[Path], resolution: int) -> torch.Tensor:
    """Scaled latent means of images, centre-cropped square: [N, C, h, w]."""
    from dreambooth_ext.train.buckets import square_crop, to_tensor
    from dreambooth_ext.train.images import load_image

    pixels = torch.stack([to_tensor(square_crop(load_image(p), resolution)) for p in paths])
    vae = bundle.vae
    param = next(vae.parameters())
    return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean.float().cpu() * bundle.vae_scale


@torch.no_grad()
def generated_latents(pipe, prompt: str, seeds: Sequence[int], steps: int, resolution: int,
                      guidance: float = 1.0) -> torch.Tensor:
    """Final latents (before decoding) of one image per seed.

    Guidance 1 (no classifier-free guidance) by default: a model fine-tuned from scratch-like
    weights never learned the empty prompt, and guidance would extrapolate from it.
    """
    out = []
    for seed in seeds:
        result = pipe(prompt, num_inference_steps=steps, height=resolution, width=resolution, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed), output_type="latent")
        out.append(result.images[0].float().cpu())
    return torch.stack(out)


@torch.no_grad()
def decoded_images(bundle, latents: torch.Tensor):
    """PIL pictures of scaled latents, through the bundle's VAE decoder (on whatever device it is)."""
    from PIL import Image

    vae = bundle.vae
    param = next(vae.parameters())
    pixels = vae.decode(latents.to(param.device, param.dtype) / bundle.vae_scale).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def mean_nearest_distance(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over samples of the L2 distance to the nearest reference latent."""
    d = torch.cdist(samples.flatten(1), references.flatten(1))
    return d.min(dim=1).values.mean().item()


@torch.no_grad()
def pixel_latents(bundle, images) -> torch.Tensor:
    """Scaled latent means of PIL images already at the wanted size (e.g. a pipeline's own output)."""
    from dreambooth_ext.train.buckets import to_tensor

    vae = bundle.vae
    param = next(vae.parameters())
    pixels = torch.stack([to_tensor(img.convert("RGB")) for img in images])
    return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean.float().cpu() * bundle.vae_scale


@torch.no_grad()
def edited_latents(pipe, prompt: str, starts: torch.Tensor, seeds: Sequence[int], steps: int, strength: float,
                   guidance: float = 1.0) -> torch.Tensor:
    """Final latents of image-to-image generations (SDEdit): each start latent noised to `strength` of
    the schedule with its seed's noise, then denoised under `prompt` with the pipeline's scheduler.

    A model trained for a few hundred steps from random weights denoises well from the middle of
    the schedule but not from pure noise, where its small errors at high noise levels compound
    into samples far from anything it was trained on; starting from a picture keeps the
    generations where the model is accurate, so what they move toward is what training taught.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    out = []
    for start, seed in zip(starts, seeds):
        # a 4-channel image is taken as already-scaled latents by the pipeline
        result = img2img(prompt, image=start[None].to(pipe.device, pipe.unet.dtype), strength=strength,
                         num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed), output_type="latent")
        out.append(result.images[0].float().cpu())
    return torch.stack(out)


def paired_distance(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean L2 distance between samples and references of the same index (the same seed)."""
    return (samples.flatten(1) - references.flatten(1)).norm(dim=1).mean().item()


@torch.no_grad()
def denoise_loss(bundle, unet, text_encoder, prompt: str, latents: torch.Tensor,
                 timesteps: Sequence[int] = (100, 300, 500, 700, 900), seed: int = 0) -> float:
    """Mean squared error of the noise predicted for `latents` noised at fixed timesteps with fixed noise,
    under `prompt`: how well a model knows these pictures by that prompt (lower = better known)."""
    tokenizer = bundle.tokenizers[0]
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    cond = text_encoder(ids)[0].expand(len(latents), -1, -1)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + int(t)))
        steps = torch.full((len(latents),), int(t))
        noisy = bundle.noise_scheduler.add_noise(latents, noise, steps)
        total += (unet(noisy, steps, cond).sample - noise).pow(2).mean().item()
    return total / len(timesteps)
