"""Training images in every mode load as upright RGB; bad files are skipped by name; captions; buckets."""

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.buckets import (
    assign_bucket,
    crop_plan,
    group_by_bucket,
    hflip,
    make_buckets,
    resize_and_crop,
    square_crop,
    to_tensor,
)
from dreambooth_ext.train.captions import build_prompt, prompt_for_image, read_caption
from dreambooth_ext.train.images import BadImage, check_instance_folder, list_images, load_image

DEMO = Path(__file__).resolve().parent.parent / "dreambooth_ext" / "data" / "demo" / "instance"


def pixel(img, xy):
    return tuple(int(v) for v in img.getpixel(xy))


def close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture
def mixed(tmp_path):
    """A folder of good images in awkward modes plus broken and non-image files."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (40, 30), 100).save(folder / "gray.png")
    la = Image.new("LA", (40, 30), (50, 255))
    la.putpixel((0, 0), (50, 0))
    la.save(folder / "la.png")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "rgba.PNG")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(folder / "palette.png", transparency=0)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    sixteen = np.full((30, 40), 32896, dtype=np.uint16)  # 128 * 257
    sixteen[0, 0] = 65535
    Image.fromarray(sixteen).save(folder / "deep.png")
    Image.fromarray(sixteen.astype(">u2")).save(folder / "deep_be.tif")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 10, 10))  # a red block top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(folder / "exif.jpeg", exif=exif.tobytes(), quality=95)

    (folder / "corrupt.jpg").write_bytes(os.urandom(800))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.webp").write_bytes(b"")
    (folder / "notes.txt").write_text("a caption", encoding="utf-8")
    (folder / "meta.json").write_text("{}", encoding="utf-8")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    return folder


GOOD = ["cmyk.jpg", "deep.png", "deep_be.tif", "exif.jpeg", "gray.png", "la.png", "palette.png", "rgba.PNG"]


def test_list_images_keeps_good_and_reports_the_rest(mixed):
    good, skipped = list_images(mixed)
    assert [p.name for p in good] == GOOD  # sorted, upper-case suffix accepted
    reasons = {p.name: reason for p, reason in skipped}
    assert set(reasons) == {"corrupt.jpg", "truncated.png", "empty.webp", "meta.json"}
    assert reasons["truncated.png"] == "truncated"
    assert reasons["empty.webp"] == "empty file"
    assert "not a" in reasons["meta.json"]
    assert list_images(mixed) == (good, skipped)


def test_every_mode_becomes_rgb(mixed):
    for name in GOOD:
        assert load_image(mixed / name).mode == "RGB", name
    assert pixel(load_image(mixed / "gray.png"), (5, 5)) == (100, 100, 100)
    la = load_image(mixed / "la.png")
    assert pixel(la, (0, 0)) == (255, 255, 255) and pixel(la, (5, 5)) == (50, 50, 50)
    rgba = load_image(mixed / "rgba.PNG")
    assert pixel(rgba, (0, 0)) == (255, 255, 255) and pixel(rgba, (5, 5)) == (255, 0, 0)
    pal = load_image(mixed / "palette.png")
    assert pixel(pal, (0, 0)) == (255, 255, 255) and pixel(pal, (5, 5)) == (0, 255, 0)
    assert close(pixel(load_image(mixed / "cmyk.jpg"), (5, 5)), (255, 0, 0))
    for name in ("deep.png", "deep_be.tif"):
        deep = load_image(mixed / name)
        assert pixel(deep, (0, 0)) == (255, 255, 255) and pixel(deep, (5, 5)) == (128, 128, 128), name


def test_sixteen_bit_as_mode_i(tmp_path):
    # Older Pillow opens 16-bit PNGs as "I"; scale them the same way rather than clip at 255.
    values = np.array([[0, 257 * 64, 65535]], dtype=np.int32)
    Image.fromarray(values, "I").save(tmp_path / "i.tif")
    img = load_image(tmp_path / "i.tif")
    assert [pixel(img, (x, 0))[0] for x in range(3)] == [0, 64, 255]


def test_exif_rotation_is_applied(mixed):
    img = load_image(mixed / "exif.jpeg")
    assert img.size == (20, 40)  # stored 40x20, displayed portrait
    assert close(pixel(img, (17, 2)), (255, 0, 0), 40)  # stored top-left is now top-right
    assert close(pixel(img, (2, 2)), (0, 0, 255), 40)


def test_bad_files_raise_bad_image(mixed):
    for name, reason in [("corrupt.jpg", "not an image"), ("truncated.png", "truncated"), ("nope.png", "missing")]:
        with pytest.raises(BadImage) as info:
            load_image(mixed / name)
        assert reason in info.value.reason
        assert name in str(info.value)


def test_check_instance_folder_warns_and_returns_good(mixed, caplog):
    with caplog.at_level(logging.WARNING):
        good = check_instance_folder(mixed, min_side=64)
    assert [p.name for p in good] == GOOD
    text = caplog.text
    assert "4 files skipped" in text and "corrupt.jpg" in text and "meta.json" in text
    assert "smaller than 64 px" in text and "upscaled" in text


def test_check_instance_folder_warn_callback(tmp_path):
    Image.new("RGB", (600, 512)).save(tmp_path / "big.png")
    Image.new("RGB", (300, 700)).save(tmp_path / "thin.png")
    messages = []
    assert len(check_instance_folder(tmp_path, min_side=512, warn=messages.append)) == 2
    assert len(messages) == 1 and "thin.png 300x700" in messages[0] and "big.png" not in messages[0]


def test_check_instance_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match="does not exist") as info:
        check_instance_folder(missing)
    assert str(missing) in str(info.value)

    a_file = tmp_path / "file.png"
    Image.new("RGB", (8, 8)).save(a_file)
    with pytest.raises(UserError, match="not a folder"):
        check_instance_folder(a_file)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "caption.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="has no images") as info:
        check_instance_folder(empty)
    assert str(empty) in str(info.value)

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        (broken / name).write_bytes(os.urandom(100))
    with pytest.raises(UserError) as info:
        check_instance_folder(broken)
    message = str(info.value)
    assert str(broken) in message and "3 files skipped" in message and "a.jpg (" in message
    assert message.count(".") >= 1 and "\n" not in message


def test_demo_images_are_usable():
    good = check_instance_folder(DEMO, min_side=64)
    assert len(good) == 6
    sizes = {load_image(p).size for p in good}
    assert (128, 128) in sizes and len(sizes) > 1
    for path in good:
        assert read_caption(path).startswith("sks_pixarstyle character, ")


# --- captions -------------------------------------------------------------------------------------

TEMPLATE = "a sks_pixarstyle character, [filewords]"


def test_build_prompt_modes():
    caption = "smiling, blue background"
    assert build_prompt(TEMPLATE, caption, "prompt") == "a sks_pixarstyle character"
    assert build_prompt(TEMPLATE, caption, "filewords") == "a sks_pixarstyle character, smiling, blue background"
    assert build_prompt(TEMPLATE, None, "filewords") == "a sks_pixarstyle character"
    assert build_prompt("[filewords], a  sks dog", None, "filewords") == "a sks dog"
    assert build_prompt("photo of [filewords] sks dog", "", "filewords") == "photo of sks dog"
    assert build_prompt("a, [FILEWORDS] ,b", "x", "filewords") == "a, x,b"
    assert build_prompt(TEMPLATE, caption, "caption") == caption
    assert build_prompt(TEMPLATE, None, "caption") == "a sks_pixarstyle character"
    assert build_prompt("a sks dog", "red", "filewords") == "a sks dog"
    with pytest.raises(ValueError):
        build_prompt(TEMPLATE, caption, "tags")


def test_read_caption(tmp_path):
    image = tmp_path / "x.png"
    assert read_caption(image) is None
    (tmp_path / "x.txt").write_bytes("\ufeffsmiling,\n  café hat \n\n".encode("utf-8"))
    assert read_caption(image) == "smiling, café hat"
    assert prompt_for_image(image, TEMPLATE, "filewords") == "a sks_pixarstyle character, smiling, café hat"
    (tmp_path / "x.txt").write_text("  \n", encoding="utf-8")
    assert read_caption(image) is None
    (tmp_path / "x.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        read_caption(image)


# --- buckets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (64, 8), (128, 8)])
def test_buckets_are_steps_within_area(resolution, step):
    buckets = make_buckets(resolution, step=step)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets) > 5
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution**2
        assert min(w, h) >= resolution // 2 and max(w, h) <= resolution * 2
        assert (h, w) in buckets


def test_assign_bucket_nearest_aspect():
    buckets = make_buckets(512)
    assert assign_bucket(1024, 1024, buckets) == (512, 512)
    wide = assign_bucket(1200, 800, buckets)
    assert wide[0] > wide[1]
    assert abs(wide[0] / wide[1] - 1.5) <= min(abs(w / h - 1.5) for w, h in buckets) + 1e-9
    assert assign_bucket(800, 1200, buckets) == wide[::-1]
    assert assign_bucket(5000, 100, buckets, upscale=True) == (1024, 256)  # clamped to the widest


def test_assign_bucket_does_not_upscale_by_default():
    buckets = make_buckets(64, step=8)
    for w, h in [(40, 40), (50, 30), (30, 100), (33, 71), (200, 20), (90, 60)]:
        bw, bh = assign_bucket(w, h, buckets)
        assert bw <= max(w, 8) and bh <= max(h, 8), (w, h)
        assert bw % 8 == 0 and bh % 8 == 0 and bw * bh <= 64 * 64
    assert assign_bucket(40, 40, buckets) == (40, 40)
    assert assign_bucket(40, 40, buckets, upscale=True) == (64, 64)
    big = make_buckets(512)
    assert assign_bucket(300, 200, big) == (256, 192)  # the image's own shape, rounded down
    assert assign_bucket(3000, 200, big) == (768, 192)  # held to the widest bucket's 4:1


def test_resize_and_crop():
    img = Image.new("RGB", (300, 200), (10, 20, 30))
    out = resize_and_crop(img, (128, 96), center=True)
    assert out.size == (128, 96)
    assert crop_plan(300, 200, (128, 96)) == ((144, 96), (8, 0))
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert crop_plan(300, 200, (64, 64), False, rng_a) == crop_plan(300, 200, (64, 64), False, rng_b)
    with pytest.raises(ValueError):
        crop_plan(300, 200, (64, 64), center=False)
    assert square_crop(Image.new("RGB", (20, 50)), 64).size == (64, 64)


def test_to_tensor_and_flip():
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 128, 0))
    x = to_tensor(img)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 4)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 128 / 127.5 - 1, -1.0]), atol=1e-5)
    assert torch.equal(hflip(x), to_tensor(hflip(img)))
    assert pixel(hflip(img), (3, 0)) == (255, 128, 0)


def test_group_by_bucket_is_homogeneous_and_deterministic():
    keys = [(64, 64)] * 7 + [(72, 56)] * 5 + [(56, 72)] * 2
    random.Random(0).shuffle(keys)
    batches = group_by_bucket(keys, batch_size=2, seed=5, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    for batch in batches:
        assert len({keys[i] for i in batch}) == 1 and 1 <= len(batch) <= 2
    assert batches == group_by_bucket(keys, batch_size=2, seed=5, epoch=0)
    assert batches != group_by_bucket(keys, batch_size=2, seed=5, epoch=1)
    assert batches != group_by_bucket(keys, batch_size=2, seed=6, epoch=0)
    full = group_by_bucket(keys, batch_size=2, seed=5, epoch=0, drop_last=True)
    assert all(len(b) == 2 for b in full) and len(full) == 3 + 2 + 1
