"""DreamBooth works: the token pulls generations toward the instance images, and prior preservation
keeps the class prompt from following them (tiny SD1, CPU, measured in latent space)."""

import pytest

from dreambooth_ext.bridge import single_file_to_diffusers
from dreambooth_ext.evaluate import generated_latents, image_latents, mean_nearest_distance
from dreambooth_ext.train.images import list_images
from dreambooth_ext.train.models import load_bundle, make_pipeline
from dreambooth_ext.train.reporter import RecordingReporter
from dreambooth_ext.train.run import train
from tests.trainer_helpers import CLASS_PROMPT, DEMO, TOKEN_PROMPT, small_config

SEEDS = list(range(100, 108))  # 8 samples per prompt
RES = 128  # 16x16 latents: at 8x8 the prior-preservation effect drowns in noise
STEPS = 10


def _distances(folder, references):
    pipe = make_pipeline(load_bundle(folder))
    return {p: mean_nearest_distance(generated_latents(pipe, p, SEEDS, STEPS, RES), references)
            for p in (TOKEN_PROMPT, CLASS_PROMPT)}


def _draw_class_members(folder, count=10):
    """Other members of the class: different characters on dark grounds, as a real base model would give.

    A tiny random model has no prior of its own worth keeping (its decoded samples re-encode
    anywhere), so the class images stand in for what a real base draws for the class prompt.
    """
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    for i in range(count):
        img = Image.new("RGB", (RES, RES), tuple(rng.randint(0, 60) for _ in range(3)))
        d = ImageDraw.Draw(img)
        body = tuple(rng.randint(60, 255) for _ in range(3))
        x, y, r = rng.randint(30, 98), rng.randint(40, 90), rng.randint(14, 30)
        d.rectangle([x - r, y - r, x + r, y + r], fill=body)
        d.ellipse([x - r // 2, y - 2 * r, x + r // 2, y - r], fill=tuple(255 - c for c in body))
        img.save(folder / f"member{i:02d}.png")


def _trained_folder(tmp_path, checkpoint, lam, class_dir):
    cfg = small_config(tmp_path / f"lam{lam}", checkpoint, resolution=RES, max_steps=200, num_class_images=10,
                       class_image_steps=10, prior_loss_weight=lam)
    cfg.concepts[0].class_dir = str(class_dir)
    result = train(cfg, RecordingReporter())
    out = tmp_path / f"lam{lam}-diffusers"
    single_file_to_diffusers(result.outputs[0], out)
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_checkpoints):
    tmp = tmp_path_factory.mktemp("effect")
    checkpoint = tiny_checkpoints("sd1")
    base = tmp / "base"
    single_file_to_diffusers(checkpoint, base)
    references = image_latents(load_bundle(base), list_images(DEMO)[0], RES)
    class_dir = tmp / "class-images"
    _draw_class_members(class_dir)
    return {
        "base": _distances(base, references),
        0.0: _distances(_trained_folder(tmp, checkpoint, 0.0, class_dir), references),
        1.0: _distances(_trained_folder(tmp, checkpoint, 1.0, class_dir), references),
    }


def test_token_pulls_generations_toward_the_instances(measured):
    print("distances to nearest instance latent:", measured)
    for lam in (0.0, 1.0):
        assert measured[lam][TOKEN_PROMPT] < 0.75 * measured["base"][TOKEN_PROMPT]


def test_prior_preservation_keeps_the_class_away_from_the_instances(measured):
    assert measured[1.0][CLASS_PROMPT] > 1.15 * measured[0.0][CLASS_PROMPT]
