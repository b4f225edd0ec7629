"""Class image generation and training samples on a tiny random SD1 (64 px, 2 steps)."""

import numpy as np
import pytest
from PIL import Image

from dreambooth_ext.train.class_images import (
    ClassJob,
    class_image_name,
    class_jobs_from_config,
    ensure_class_images,
)
from dreambooth_ext.train.config import Concept, TrainConfig
from dreambooth_ext.train.samples import generate_samples, make_grid, sample_prompts, sample_seeds, save_grid
from tests.trainer_helpers import count_class_images

RES = 64
GEN = dict(steps=2, guidance=7.0, negative_prompt="", resolution=RES)
PROMPT = "a pixar-style character"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from dreambooth_ext.bridge import single_file_to_diffusers
    from dreambooth_ext.tiny import write_tiny_checkpoint
    from dreambooth_ext.train.models import load_bundle

    root = tmp_path_factory.mktemp("tiny_sd1")
    ckpt = write_tiny_checkpoint("sd1", root / "tiny.safetensors", seed=0)
    single_file_to_diffusers(ckpt, root / "model")
    return load_bundle(root / "model")


def _own_images(folder, n):
    for i in range(n):
        Image.new("RGB", (RES, RES), (40 * i, 80, 120)).save(folder / f"mine_{i}.png")


def _ensure(bundle, folder, count, **kw):
    args = dict(GEN, batch_size=2, seed=7)
    args.update(kw)
    return ensure_class_images(bundle, [ClassJob(PROMPT, folder, count)], **args)


def test_generates_only_the_missing_class_images(bundle, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    _own_images(folder, 2)
    (folder / "notes.md").write_text("not an image")
    (folder / "broken.png").write_bytes(b"not a png")
    reports = []
    made = _ensure(bundle, folder, 5, progress=lambda d, t, m: reports.append((d, t)))

    assert made == {str(folder): 3}
    assert count_class_images(folder) == 5
    assert reports[0] == (0, 3) and reports[-1] == (3, 3)
    for i in range(3):
        path = folder / class_image_name(PROMPT, i)
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (RES, RES) and img.mode == "RGB"
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip() == PROMPT
    assert not list(folder.glob(".*"))  # no temporary files left
    assert _ensure(bundle, folder, 5) == {str(folder): 0}
    assert count_class_images(folder) == 5


def test_missing_class_images_come_back_byte_identical(bundle, tmp_path):
    folder = tmp_path / "class"
    _ensure(bundle, folder, 3, batch_size=3)
    victim = folder / class_image_name(PROMPT, 1)
    before = victim.read_bytes()
    victim.unlink()
    assert _ensure(bundle, folder, 3, batch_size=3) == {str(folder): 1}
    assert victim.read_bytes() == before

    # asking for more later gives the files a single run for the larger count would have made
    _ensure(bundle, folder, 5, batch_size=3)
    whole = tmp_path / "whole"
    _ensure(bundle, whole, 5, batch_size=3)
    for i in range(5):
        name = class_image_name(PROMPT, i)
        assert (folder / name).read_bytes() == (whole / name).read_bytes()

    # another seed gives other pictures
    other = tmp_path / "other"
    _ensure(bundle, other, 1, seed=8)
    assert (other / class_image_name(PROMPT, 0)).read_bytes() != (folder / class_image_name(PROMPT, 0)).read_bytes()


def test_should_stop_ends_after_the_first_batch(bundle, tmp_path):
    folder = tmp_path / "class"
    done = []
    made = _ensure(bundle, folder, 5, progress=lambda d, t, m: done.append(d), should_stop=lambda: done[-1] > 0)
    assert made == {str(folder): 2}
    assert count_class_images(folder) == 2
    # the next run carries on where it stopped
    assert _ensure(bundle, folder, 5) == {str(folder): 3}


def test_train_state_restored_after_class_images(bundle, tmp_path):
    bundle.unet.train()
    try:
        _ensure(bundle, tmp_path / "class", 1)
        assert bundle.unet.training and not bundle.vae.training
    finally:
        bundle.unet.eval()


def test_jobs_sharing_a_folder_and_prompt_are_merged(bundle, tmp_path):
    folder = tmp_path / "shared"
    made = ensure_class_images(bundle, [ClassJob(PROMPT, folder, 2), ClassJob(PROMPT, folder, 3)],
                               batch_size=4, seed=1, **GEN)
    assert made == {str(folder): 3}


def test_class_jobs_from_config(tmp_path):
    cfg = TrainConfig(name="run", models_dir=str(tmp_path), concepts=[
        Concept(instance_dir="a", instance_prompt="sks dog", class_prompt="a dog", num_class_images=10),
        Concept(instance_dir="b", instance_prompt="zwx cat", class_prompt="", num_class_images=10),
        Concept(instance_dir="c", instance_prompt="ohwx car", class_prompt="a car", num_class_images=0),
        Concept(instance_dir="d", instance_prompt="xyz hat", class_prompt="a hat", class_dir=str(tmp_path / "hats"),
                num_class_images=4),
    ])
    jobs = class_jobs_from_config(cfg)
    assert [(j.prompt, j.count) for j in jobs] == [("a dog", 10), ("a hat", 4)]
    assert jobs[0].folder == cfg.class_path(cfg.concepts[0]) and jobs[1].folder == tmp_path / "hats"
    cfg.prior_loss_weight = 0
    assert class_jobs_from_config(cfg) == []


def test_generate_samples_names_pixels_and_modes(bundle, tmp_path):
    bundle.unet.train()  # as it is mid-training
    seen = []
    try:
        kw = dict(GEN, out_dir=tmp_path / "samples", step=40)
        paths = generate_samples(bundle, bundle.unet, None, ["sks dog", "a cat"], [5, 9],
                                 on_image=lambda p, pr, s: seen.append((p.name, pr, s)), **kw)
        assert bundle.unet.training and not bundle.text_encoders[0].training and not bundle.vae.training
    finally:
        bundle.unet.eval()
    folder = tmp_path / "samples" / "step_000040"
    assert paths == [folder / n for n in ("0-5.png", "0-9.png", "1-5.png", "1-9.png")]
    assert seen == [("0-5.png", "sks dog", 5), ("0-9.png", "sks dog", 9), ("1-5.png", "a cat", 5), ("1-9.png", "a cat", 9)]
    with Image.open(paths[1]) as img:
        assert img.size == (RES, RES)
        assert (img.text["prompt"], img.text["seed"], img.text["step"]) == ("sks dog", "9", "40")
        first = np.asarray(img.convert("RGB"))

    # the same seed gives the same pixels, alone or among others; another seed does not
    again = generate_samples(bundle, None, None, ["sks dog"], [9], out_dir=tmp_path / "again", step=41, **GEN)
    with Image.open(again[0]) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), first)
    with Image.open(paths[0]) as img:
        assert not np.array_equal(np.asarray(img.convert("RGB")), first)


def test_sample_prompts_and_seeds():
    cfg = TrainConfig(concepts=[
        Concept(instance_prompt="a [filewords] photo of sks_pixarstyle character", caption_mode="filewords"),
        Concept(instance_prompt="a photo of sks_pixarstyle character"),
        Concept(instance_prompt="", caption_mode="caption"),
    ], sample_prompts=["a photo of sks_pixarstyle character", "  ", "sks_pixarstyle in a forest"])
    assert sample_prompts(cfg) == ["a photo of sks_pixarstyle character", "sks_pixarstyle in a forest"]

    cfg.seed = 100
    assert sample_seeds(cfg, 3) == [100, 101, 102]
    cfg.sample_seeds = [7, 3]
    assert sample_seeds(cfg, 4) == [7, 3, 4, 5]
    assert sample_seeds(cfg, 1) == [7]


def test_grid(tmp_path):
    images = [Image.new("RGB", (32, 24), (i * 40, 0, 0)) for i in range(5)]
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    grid = make_grid(paths, cols=2)
    assert grid.size == (64, 72)
    assert grid.getpixel((32, 24)) == (120, 0, 0)  # the fourth image, second row, second column
    assert grid.getpixel((40, 60)) == (0, 0, 0)  # the empty sixth cell
    assert make_grid(images, cols=10).size == (160, 24)
    out = save_grid(images, 3, tmp_path / "grids" / "g.png")
    with Image.open(out) as img:
        assert img.size == (96, 48)
