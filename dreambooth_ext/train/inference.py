"""Images from a pipeline whose modules live in mixed dtypes: a fp32 trained UNet beside half-precision frozen parts.

    images = generate_images(pipe, placement.autocast, prompt=..., num_inference_steps=..., ...)

The denoising loop runs under autocast (the pipeline alone takes the latents' dtype from the prompt
embeddings, so half latents would meet a fp32 UNet); the latents are then cast to the VAE's own
dtype and decoded outside autocast, so a fp32 VAE kept for fp16 runs really decodes in fp32.
"""

import contextlib
from typing import Callable, ContextManager, Iterable, Iterator, List, Optional

import torch

from dreambooth_ext.bridge.components import text_encoder_name
from dreambooth_ext.vae_io import vae_input

AutocastFactory = Callable[[], ContextManager]


def pipeline_text_encoders(pipe) -> List[torch.nn.Module]:
    """The pipeline's text encoders in diffusers order: text_encoder, and text_encoder_2 on SDXL."""
    second = getattr(pipe, text_encoder_name(1), None)
    return [pipe.text_encoder] + ([second] if second is not None else [])


def pipeline_modules(pipe) -> List[torch.nn.Module]:
    return [pipe.unet, pipe.vae] + pipeline_text_encoders(pipe)


@contextlib.contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The modules in eval mode inside the block (dropout off: a seed gives the same image), then each
    back in the train/eval state it came in (the trained ones keep training)."""
    modules = list(modules)
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


def generate_images(pipe, autocast: Optional[AutocastFactory] = None, text=None, **call) -> List:
    """PIL images for one pipeline call (any arguments but output_type).

    `text` (conditioning.TextOptions): the prompts are encoded here the WebUI's way (long prompts in
    chunks, clip skip) and handed to the pipeline as embeddings."""
    autocast = autocast or contextlib.nullcontext
    with torch.no_grad():
        with autocast():
            if text is not None:
                call = with_embeddings(pipe, call, text)
            latents = pipe(**call, output_type="latent").images
        return decode_latents(pipe, latents)


def with_embeddings(pipe, call: dict, text) -> dict:
    """The call with prompt and negative_prompt replaced by their embeddings (equal lengths, for CFG).

    An empty negative prompt on SDXL stays empty: the pipeline then uses zeros, as the WebUI does."""
    from dreambooth_ext.train.conditioning import encode_prompts

    call = dict(call)
    prompts = call.pop("prompt")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = call.pop("negative_prompt", None) or ""
    negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
    encoders = pipeline_text_encoders(pipe)
    sdxl = len(encoders) > 1
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
    zero_negative = sdxl and not any(negatives)
    texts = prompts if zero_negative else prompts + negatives
    emb, pooled = encode_prompts(encoders, tokenizers, texts, sdxl, text)
    n = len(prompts)
    call["prompt_embeds"] = emb[:n]
    if not zero_negative:
        call["negative_prompt_embeds"] = emb[n:]
    if sdxl:
        call["pooled_prompt_embeds"] = pooled[:n]
        if not zero_negative:
            call["negative_pooled_prompt_embeds"] = pooled[n:]
    return call


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> List:
    vae = pipe.vae
    latents = vae_input(latents, vae)
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # VAEs with per-channel latent statistics
        shape = (1, latents.shape[1], 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    # One picture at a time: the decoder's full-resolution activations grow with the batch (at 1024 px
    # in a fp32 VAE, about 0.5 GB per picture for each 128-channel map), and a class-image batch
    # must not need more memory than the training step the estimate is for.
    images = []
    for one in latents.split(1):
        image = vae.decode(one, return_dict=False)[0]
        images += pipe.image_processor.postprocess(image.float(), output_type="pil")
    return images
