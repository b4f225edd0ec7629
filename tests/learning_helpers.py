"""DreamBooth runs on the shipped drawn base, read back from the files the trainer writes.

A full run's checkpoint is read through the bridge; a LoRA file is added to the base the way the
WebUI's Lora extension does (names resolved by tests/test_lora.py's transcription of
networks.py, delta = up @ down * alpha / rank added to the resolved layer's weight).
What a model knows is measured as its denoising loss on reference latents under a prompt.
"""

import copy
from pathlib import Path
from typing import Dict, Sequence

import torch

from dreambooth_ext.bridge import single_file_to_diffusers
from dreambooth_ext.evaluate import image_latents
from dreambooth_ext.train.config import Concept, TrainConfig
from dreambooth_ext.train.images import list_images
from dreambooth_ext.train.lora_export import load_webui_lora
from dreambooth_ext.train.models import load_bundle
from tests.recording import RecordingReporter
from dreambooth_ext.train.run import train

DEMO = Path(__file__).resolve().parent.parent / "dreambooth_ext" / "data" / "demo" / "instance"
TOKEN = "a sks_pixarstyle character"
CLASS = "a character"
UNRELATED = "a red circle"
RES = 64
STEPS = 20

# recommended settings for the tiny base (see the learning tests for what they give)
# (full: 400 steps of 5e-5 learn the token better than 200 of 1e-4, x0.30-0.31 against x0.32-0.34, and let
# the class and an unrelated caption drift less, x1.35-1.54 and x1.87-2.02 against x1.43-1.60 and x2.04-2.25)
FULL = dict(train_mode="full", learning_rate=5e-5, max_steps=400)
LORA = dict(train_mode="lora", lora_learning_rate=3e-4, lora_rank=8, lora_targets="attention_ff_conv", max_steps=200)


def config(tmp: Path, base: Path, **overrides) -> TrainConfig:
    concept = Concept(instance_dir=str(DEMO), instance_prompt=TOKEN, class_prompt=CLASS,
                      num_class_images=overrides.pop("num_class_images", 8))
    concept.class_dir = str(tmp / "class-images")
    settings = dict(checkpoint=str(base), name="learn", models_dir=str(tmp / "models"), concepts=[concept],
                    resolution=RES, bucketing=False, class_image_steps=STEPS, class_image_guidance=1.0,
                    prior_loss_weight=1.0, save_dtype="fp32", seed=7, lr_scheduler="constant")
    settings.update(overrides)
    return TrainConfig(**settings)


def base_folder(base: Path, tmp: Path) -> Path:
    folder = tmp / "base-diffusers"
    if not (folder / "model_index.json").is_file():
        single_file_to_diffusers(base, folder, progress=lambda _m: None)
    return folder


def trained_modules(tmp: Path, base: Path, **overrides):
    """Train, then (bundle, unet, text encoders) of what was written: the checkpoint, or the base plus the LoRA file."""
    cfg = config(tmp, base, **overrides)
    result = train(cfg, RecordingReporter())
    assert result.status == "finished", result
    written = Path(result.outputs[0])
    if cfg.train_mode == "lora":
        bundle = load_bundle(base_folder(base, tmp.parent))
        unet, tes = copy.deepcopy(bundle.unet), [copy.deepcopy(t) for t in bundle.text_encoders]
        add_webui_lora(bundle, unet, tes, written)
        return bundle, unet, tes
    folder = tmp / f"{written.stem}-diffusers"
    single_file_to_diffusers(written, folder, progress=lambda _m: None)
    bundle = load_bundle(folder)
    return bundle, bundle.unet, bundle.text_encoders


def drawn_latents(bundle, caption: str, seeds=range(20_000, 20_008)) -> torch.Tensor:
    """Latents of the drawn pictures the base learned for `caption` (seeds it was not trained on)."""
    from dreambooth_ext import drawn
    from dreambooth_ext.evaluate import pixel_latents

    return pixel_latents(bundle, drawn.pictures(caption, seeds))


def known(bundle, unet, tes, references: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Denoising loss of each prompt on its reference latents (the instances for the token)."""
    return {p: denoise_loss(bundle, unet, tes[0], p, lat) for p, lat in references.items()}


@torch.no_grad()
def add_webui_lora(bundle, unet, text_encoders, path: Path, multiplier: float = 1.0):
    """Add a written LoRA file's deltas to these modules as A1111's networks.py would place them."""
    from tests.webui_double.lora_networks import find_layer, lora_updown, network_layer_names

    sd = load_webui_lora(path)
    modules, targets = network_layer_names(bundle.family, bundle.unet, bundle.text_encoders)
    models = [unet] + list(text_encoders)
    for name in {k.split(".", 1)[0] for k in sd}:
        hit = find_layer(name, modules, bundle.family.startswith("sd2"))
        assert hit is not None, f"the WebUI would not load {name}"
        component, path_in_model = targets[hit[0]]
        weight = models[component].get_submodule(path_in_model).weight
        down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
        delta = lora_updown(down, up, sd[f"{name}.alpha"], weight.shape)
        weight += multiplier * delta.to(weight.dtype)


def instance_latents(base: Path, tmp: Path) -> torch.Tensor:
    bundle = load_bundle(base_folder(base, tmp))
    return image_latents(bundle, list_images(DEMO)[0], RES)


def world(tmp: Path, base: Path):
    """(tmp, base, the reference latents per prompt, how well the base knows each): a learning test's start."""
    bundle = load_bundle(base_folder(base, tmp))
    refs = {TOKEN: instance_latents(base, tmp), CLASS: drawn_latents(bundle, CLASS),
            UNRELATED: drawn_latents(bundle, UNRELATED)}
    return tmp, base, refs, known(bundle, bundle.unet, bundle.text_encoders, refs)


def ratios(world, name: str, **overrides) -> Dict[str, float]:
    """How well the model trained with `overrides` knows each prompt's references, as a share of the base's."""
    tmp, base, refs, before = world
    bundle, unet, tes = trained_modules(tmp / name, base, **overrides)
    after = known(bundle, unet, tes, refs)
    out = {p: after[p] / before[p] for p in refs}
    print(name, {p: round(v, 3) for p, v in out.items()})
    return out


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
