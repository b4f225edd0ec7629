"""The DreamBooth objective: the diffusion loss on instance images plus lambda times it on class images."""

from typing import Optional

import torch
import torch.nn.functional as F


def sample_noise_and_timesteps(latents: torch.Tensor, scheduler, seed: int, offset_noise: float):
    """Noise and timesteps from a CPU generator seeded per micro-batch: the same on any device, and on resume."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    if offset_noise > 0:
        # a per-channel constant shift lets the model learn overall brightness (offset noise)
        noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def noised(scheduler, latents: torch.Tensor, *, seed: int, offset_noise: float = 0.0):
    """(noisy latents, timesteps, target) of one batch: what the UNet sees and what it should predict."""
    noise, timesteps = sample_noise_and_timesteps(latents, scheduler, seed, offset_noise)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "epsilon":
        target = noise
    else:
        raise ValueError(f"prediction type {prediction_type!r} is not trainable here")
    return noisy, timesteps, target


def prediction_loss(scheduler, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean (optionally Min-SNR weighted) squared error of one batch's prediction."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        per_sample = per_sample * snr_weights(scheduler, timesteps, min_snr_gamma, scheduler.config.prediction_type)
    return per_sample.mean()


def diffusion_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, *, seed: int,
                   offset_noise: float = 0.0, min_snr_gamma: float = 0.0,
                   added_cond: Optional[dict] = None) -> torch.Tensor:
    """Mean loss of one batch of latents (already scaled) under its conditioning."""
    noisy, timesteps, target = noised(scheduler, latents, seed=seed, offset_noise=offset_noise)
    pred = unet(noisy, timesteps, cond, added_cond_kwargs=added_cond).sample
    return prediction_loss(scheduler, pred, target, timesteps, min_snr_gamma)
