"""DreamBooth works: the token pulls generations toward the instance images, and prior preservation
keeps the class prompt from following them (tiny random SD1, CPU, measured in latent space).

How it is measured, and why not as the issue first described it (pure-noise sampling):

- Generations are image-to-image (SDEdit, strength 0.5, DDIM, guidance 1) from the base model's
  own pictures for the class prompt, decoded and re-encoded, at seeds the class images do not use.
  A model trained 200 steps from random weights predicts the noise well at mid and low noise but
  not at the top of the schedule, where a tiny error in the noise is a large error in the picture;
  sampled from pure noise, its DDIM trajectories drift (norm 32 -> 45) and land ~45 from every
  training latent (instances are ~28 apart), token, class prompt and either lambda alike, so
  neither the concept nor the prior shows. From the middle of the schedule the model is
  accurate, and where the generations move is what training taught it.
- Class images are made by the trainer itself with the base model (the product's path); the
  starts are the same kind of picture at other seeds, so lambda = 1 did not train on them.
- The tiny UNet barely reads its prompt (the noise predictions for the token and the class prompt
  differ by ~1% after training), so the class prompt's generations follow whatever the whole run
  learned: with lambda = 0 only the instances, with lambda = 1 the class images too. That is the
  leakage prior preservation exists to stop, measured as how far the class prompt's generations
  move from their start toward the nearest instance latent.
- The base model's own samples are no yardstick: it has no prior (its raw samples reach norms of
  ~300), which is also why the issue saw nothing when comparing against them.
"""

from typing import Sequence

import pytest
import torch

from dreambooth_ext.bridge import single_file_to_diffusers
from dreambooth_ext.evaluate import image_latents, mean_nearest_distance, pixel_latents
from dreambooth_ext.train.images import list_images
from dreambooth_ext.train.models import load_bundle, make_pipeline
from dreambooth_ext.train.run import train
from tests.recording import RecordingReporter
from tests.trainer_helpers import CLASS_PROMPT, DEMO, TOKEN_PROMPT, small_config

SEEDS = list(range(100, 108))  # 8 generations per prompt
RES = 128  # 16x16 latents
STEPS = 10
STRENGTH = 0.5
CLASS_STEPS = 10  # sampling steps of the class images and of the starts
CLASS_GUIDANCE = 7.0  # as the trainer makes class images
TRAIN_STEPS = 200


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


def _trained_folder(tmp, checkpoint, lam, train_seed):
    cfg = small_config(tmp / f"lam{lam}", checkpoint, resolution=RES, max_steps=TRAIN_STEPS, num_class_images=10,
                       class_image_steps=CLASS_STEPS, class_image_guidance=CLASS_GUIDANCE, prior_loss_weight=lam,
                       seed=train_seed)
    cfg.concepts[0].class_dir = str(tmp / "class-images")  # empty: the trainer draws them with the base
    result = train(cfg, RecordingReporter())
    out = tmp / f"lam{lam}-diffusers"
    single_file_to_diffusers(result.outputs[0], out)
    return out


def _starts(base):
    """The base model's pictures for the class prompt, as latents."""
    pipe = make_pipeline(base)
    images = [pipe(CLASS_PROMPT, num_inference_steps=CLASS_STEPS, guidance_scale=CLASS_GUIDANCE, height=RES,
                   width=RES, generator=torch.Generator().manual_seed(s)).images[0] for s in SEEDS]
    return pixel_latents(base, images)


def measure(tmp, checkpoint, train_seed=7):
    """Mean distance to the nearest instance latent: of the starts, and of each model's generations per prompt."""
    base_folder = tmp / "base"
    single_file_to_diffusers(checkpoint, base_folder)
    base = load_bundle(base_folder)
    references = image_latents(base, list_images(DEMO)[0], RES)
    starts = _starts(base)
    folders = {"base": base_folder}
    for lam in (0.0, 1.0):
        folders[lam] = _trained_folder(tmp, checkpoint, lam, train_seed)
    out = {"start": mean_nearest_distance(starts, references)}
    for key, folder in folders.items():
        pipe = make_pipeline(load_bundle(folder))
        out[key] = {p: mean_nearest_distance(edited_latents(pipe, p, starts, SEEDS, STEPS, STRENGTH), references)
                    for p in (TOKEN_PROMPT, CLASS_PROMPT)}
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_checkpoints):
    result = measure(tmp_path_factory.mktemp("effect"), tiny_checkpoints("sd1"))
    print("distances to the nearest instance latent:", result)
    return result


def test_token_pulls_generations_toward_the_instances(measured):
    for lam in (0.0, 1.0):
        assert measured[lam][TOKEN_PROMPT] < 0.75 * measured["base"][TOKEN_PROMPT]
        assert measured[lam][TOKEN_PROMPT] < measured["start"]


def test_prior_preservation_keeps_the_class_away_from_the_instances(measured):
    pull = {lam: measured["start"] - measured[lam][CLASS_PROMPT] for lam in (0.0, 1.0)}
    assert pull[0.0] > 0  # without the prior, the concept leaks into the class prompt
    # measured (checkpoint seed / training seed 0/7 and 1/11): pull 4.05 -> 2.09 and 3.66 -> 2.30,
    # class distance 23.16 -> 25.13 and 20.73 -> 22.09; the two prompts of one model differ by < 0.1
    assert pull[1.0] < 0.75 * pull[0.0]
    assert measured[1.0][CLASS_PROMPT] > 1.03 * measured[0.0][CLASS_PROMPT]
