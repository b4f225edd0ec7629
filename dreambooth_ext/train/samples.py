"""Samples during training: fixed prompts and seeds, so images from different steps compare like for like.

    prompts = sample_prompts(cfg)
    seeds = sample_seeds(cfg, cfg.num_sample_images)
    paths = generate_samples(bundle, unet, text_encoders, prompts, seeds, steps=cfg.sample_steps,
                             guidance=cfg.sample_guidance, negative_prompt=cfg.sample_negative_prompt,
                             resolution=cfg.resolution, out_dir=workspace / "samples", step=step)
    save_grid(paths, cols=len(seeds), path=workspace / "samples" / f"step_{step:06d}.png")

Each image is generated alone, with its own CPU generator: the same prompt and seed give the same
picture whatever the device, batch size or number of sample images.
"""

import math
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dreambooth_ext.atomic import write_png
from dreambooth_ext.train.captions import build_prompt
from dreambooth_ext.train.inference import AutocastFactory, eval_mode, generate_images, pipeline_modules
from dreambooth_ext.train.models import ModelBundle, make_pipeline

ImageLike = Union[str, os.PathLike, Image.Image]
OnImage = Callable[[Path, str, int], None]


def sample_prompts(cfg) -> List[str]:
    """Each concept's instance prompt ([filewords] removed) and its own sample prompts, then the run's prompts;
    no repeats, order kept."""
    prompts = []
    for c in cfg.concepts:
        prompts.append(build_prompt(c.instance_prompt, None, "filewords"))
        prompts += [p.strip() for p in c.concept_sample_prompts]
    prompts += [p.strip() for p in cfg.sample_prompts]
    return list(dict.fromkeys(p for p in prompts if p))


def sample_seeds(cfg, n: int) -> List[int]:
    """n seeds: the configured ones, then counting up from the last of them (or from cfg.seed when none)."""
    seeds = [int(s) for s in cfg.sample_seeds[:n]]
    next_seed = seeds[-1] + 1 if seeds else int(cfg.seed)
    while len(seeds) < n:
        seeds.append(next_seed)
        next_seed += 1
    return seeds


def _png_info(prompt: str, seed: int, step: int, *, steps: int, guidance: float, negative_prompt: str,
              resolution: int) -> PngInfo:
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(seed))
    info.add_text("step", str(step))
    # The WebUI's own "parameters" chunk, so PNG Info and "send to txt2img" read the sample too.
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    info.add_text("parameters", f"{prompt}{negative}\nSteps: {steps}, Sampler: DDIM, CFG scale: {guidance}, "
                                f"Seed: {seed}, Size: {resolution}x{resolution}")
    return info


def generate_samples(bundle: ModelBundle, unet, text_encoders, prompts: Sequence[str], seeds: Sequence[int], *,
                     steps: int, guidance: float, negative_prompt: str, resolution: int, out_dir, step: int,
                     on_image: Optional[OnImage] = None, autocast: Optional[AutocastFactory] = None,
                     text=None) -> List[Path]:
    """One PNG per (prompt, seed) in out_dir/step_<step>/, named <prompt index>-<seed>.png.

    `unet` and `text_encoders` are the modules being trained (None: the bundle's own). They are put
    in eval mode for the samples and given back in the train/eval state they came in. `autocast`
    (the run's mixed precision) lets a fp32 trained UNet meet half-precision frozen modules. `text`
    (conditioning.TextOptions) reads long prompts and clip skip as the training does.
    """
    pipe = make_pipeline(bundle, unet=unet, text_encoders=text_encoders)
    folder = Path(out_dir) / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    negative = negative_prompt or None
    paths = []
    with eval_mode(pipeline_modules(pipe)), torch.no_grad():
        for p_index, prompt in enumerate(prompts):
            for seed in seeds:
                generator = torch.Generator().manual_seed(int(seed))  # CPU: reproducible across devices
                image = generate_images(pipe, autocast, text, prompt=prompt, negative_prompt=negative,
                                        num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                                        width=resolution, generator=generator)[0]
                info = _png_info(prompt, seed, step, steps=steps, guidance=guidance,
                                 negative_prompt=negative_prompt, resolution=resolution)
                path = write_png(folder / f"{p_index}-{seed}.png", image, info, "the sample image")
                paths.append(path)
                if on_image:
                    on_image(path, prompt, seed)
    return paths


def _as_image(item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as img:
        return img.convert("RGB")


def make_grid(paths_or_images: Sequence[ImageLike], cols: int) -> Image.Image:
    """The images in rows of `cols`, each in a cell the size of the largest, on black."""
    images = [_as_image(item) for item in paths_or_images]
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = max(1, min(int(cols), len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * cell_w, (i // cols) * cell_h))
    return grid


def save_grid(paths_or_images: Sequence[ImageLike], cols: int, path) -> Path:
    """make_grid written atomically as a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(path, make_grid(paths_or_images, cols), what="the sample image")
