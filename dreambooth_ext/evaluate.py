"""Measuring what training did, in latent space: how close generations come to the instance images.

Used by the training monitor, the demo and the learning tests.
"""

from pathlib import Path
from typing import Sequence

import torch

from dreambooth_ext.vae_io import vae_input


@torch.no_grad()
def image_latents(bundle, paths: Sequence[Path], resolution: int) -> torch.Tensor:
    """Scaled latent means of images, centre-cropped square: [N, C, h, w]."""
    from dreambooth_ext.train.buckets import square_crop, to_tensor
    from dreambooth_ext.train.images import load_image

    return _encoded(bundle, (to_tensor(square_crop(load_image(p), resolution)) for p in paths))


def _encoded(bundle, pixels) -> torch.Tensor:
    """Scaled latent means of [C, H, W] pixel tensors, one picture at a time through the VAE.

    One at a time because the VAE's full-resolution activations grow with the batch: a user's 30
    instance images at 1024 px encoded together would need tens of GB of GPU memory."""
    vae = bundle.vae
    out = [vae.encode(vae_input(x[None], vae)).latent_dist.mean.float().cpu() for x in pixels]
    return torch.cat(out) * bundle.vae_scale


@torch.no_grad()
def generated_latents(pipe, prompt: str, seeds: Sequence[int], steps: int, resolution: int,
                      guidance: float = 1.0, text=None) -> torch.Tensor:
    """Final latents (before decoding) of one image per seed.

    Guidance 1 (no classifier-free guidance) by default: a model fine-tuned from scratch-like
    weights never learned the empty prompt, and guidance would extrapolate from it.
    `text` (conditioning.TextOptions): the prompt is encoded as samples encode it (long prompts, clip
    skip, emphasis), not by the pipeline's own tokenizer call.
    """
    from dreambooth_ext.train.inference import with_embeddings

    out = []
    for seed in seeds:
        call = dict(prompt=prompt, num_inference_steps=steps, height=resolution, width=resolution,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(seed))
        if text is not None:
            call = with_embeddings(pipe, call, text)
        result = pipe(**call, output_type="latent")
        out.append(result.images[0].float().cpu())
    return torch.stack(out)


@torch.no_grad()
def decoded_images(bundle, latents: torch.Tensor):
    """PIL pictures of scaled latents, through the bundle's VAE decoder (on whatever device it is)."""
    from PIL import Image

    vae = bundle.vae
    pictures = []
    for one in latents.split(1):  # one at a time, as _encoded
        pixels = vae.decode(vae_input(one, vae) / bundle.vae_scale).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pictures.append(Image.fromarray(pixels[0]))
    return pictures


def mean_nearest_distance(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over samples of the L2 distance to the nearest reference latent."""
    d = torch.cdist(samples.flatten(1), references.flatten(1))
    return d.min(dim=1).values.mean().item()


@torch.no_grad()
def pixel_latents(bundle, images) -> torch.Tensor:
    """Scaled latent means of PIL images already at the wanted size (e.g. a pipeline's own output)."""
    from dreambooth_ext.train.buckets import to_tensor

    return _encoded(bundle, (to_tensor(img.convert("RGB")) for img in images))


def paired_distance(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean L2 distance between samples and references of the same index (the same seed)."""
    return (samples.flatten(1) - references.flatten(1)).norm(dim=1).mean().item()
