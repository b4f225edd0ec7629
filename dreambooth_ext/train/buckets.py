"""Aspect-ratio buckets (after kohya sd-scripts), resize-and-crop, and image -> tensor without torchvision.

A bucket is a (width, height) in pixels, both multiples of ``step`` (64 by default; the VAE needs 8).
Without bucketing every image goes to the one square bucket ``[(resolution, resolution)]`` with
``upscale=True``, so batches stay one size.
"""

import math
import random
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

Bucket = Tuple[int, int]


def _floor(value: float, step: int) -> int:
    return int(value // step) * step


def make_buckets(
    resolution: int,
    min_side: Optional[int] = None,
    max_side: Optional[int] = None,
    step: int = 64,
) -> List[Bucket]:
    """Every (w, h) with w * h <= resolution**2, sides multiples of ``step`` in [min_side, max_side].

    Each width gets the tallest height that fits the area, as in kohya. Defaults: min_side is half
    the resolution (256 at 512), max_side twice it. Sorted by aspect ratio, widest last.
    """
    if resolution < step:
        raise ValueError(f"resolution {resolution} is below the bucket step {step}")
    min_side = max(step, _floor(min_side if min_side is not None else resolution // 2, step))
    max_side = _floor(max_side if max_side is not None else resolution * 2, step)
    area = resolution * resolution
    square = _floor(resolution, step)
    buckets = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, _floor(area // width, step))
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def _aspect_error(w: int, h: int, bucket: Bucket) -> float:
    # Log ratio so 2:1 and 1:2 are equally far from square.
    return abs(math.log(w / h) - math.log(bucket[0] / bucket[1]))


def assign_bucket(
    w: int, h: int, buckets: Sequence[Bucket], upscale: bool = False, step: Optional[int] = None
) -> Bucket:
    """The bucket of nearest aspect ratio for a w x h image (ties: the larger one).

    Without ``upscale``, an image that cannot cover that bucket gets a smaller bucket of its own,
    as kohya's ``bucket_no_upscale`` does: the largest rectangle of its aspect ratio (held to the
    buckets' range of ratios) inside the image, sides rounded down to ``step``. So it is only ever
    shrunk. ``step`` defaults to the buckets' greatest common divisor (at most 64).
    """
    if not buckets:
        raise ValueError("no buckets to choose from")
    best = min(buckets, key=lambda b: (_aspect_error(w, h, b), -b[0] * b[1], b))
    if upscale or (w >= best[0] and h >= best[1]):
        return best
    step = step or _step_of(buckets)
    ratios = [bw / bh for bw, bh in buckets]
    ratio = min(max(w / h, min(ratios)), max(ratios))
    tw, th = min(w, h * ratio), min(h, w / ratio)
    area = max(bw * bh for bw, bh in buckets)
    if tw * th > area:
        shrink = math.sqrt(area / (tw * th))
        tw, th = tw * shrink, th * shrink
    return (max(step, _floor(tw, step)), max(step, _floor(th, step)))


def _step_of(buckets: Sequence[Bucket]) -> int:
    step = 0
    for w, h in buckets:
        step = math.gcd(step, math.gcd(w, h))
    # A lone square bucket would give its own side; never round to more than 64.
    return min(step, 64) if step else 8


def crop_plan(
    w: int, h: int, size: Bucket, center: bool = True, rng: Optional[random.Random] = None
) -> Tuple[Bucket, Bucket]:
    """How a w x h image becomes ``size``: the resized (w, h) that covers it and the crop's (left, top).

    Kept apart from the pixels so SDXL's size and crop conditioning can be computed from it.
    """
    bw, bh = size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if center:
        return (rw, rh), ((rw - bw) // 2, (rh - bh) // 2)
    if rng is None:
        raise ValueError("a random crop needs an rng (random.Random)")
    return (rw, rh), (rng.randint(0, rw - bw), rng.randint(0, rh - bh))


def resize_and_crop(
    img: Image.Image, size: Bucket, center: bool = True, rng: Optional[random.Random] = None
) -> Image.Image:
    """Resize keeping the aspect ratio (LANCZOS) until ``size`` is covered, then crop to it."""
    (rw, rh), (left, top) = crop_plan(img.width, img.height, size, center, rng)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.LANCZOS)
    return img.crop((left, top, left + size[0], top + size[1]))


def square_crop(img: Image.Image, resolution: int, center: bool = True, rng: Optional[random.Random] = None):
    """No bucketing: shorter side to ``resolution``, then a square crop."""
    return resize_and_crop(img, (resolution, resolution), center, rng)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as float32 [3, H, W] in [-1, 1], the range the VAE encodes."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32)
    array = array / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def hflip(x: Union[Image.Image, torch.Tensor]):
    """Mirror left-right: a PIL image, or a tensor along its last (width) axis."""
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=[-1])
    return x.transpose(Image.FLIP_LEFT_RIGHT)


def group_by_bucket(
    items: Sequence[Hashable],
    batch_size: int,
    seed: int,
    epoch: int,
    drop_last: bool = False,
) -> List[List[int]]:
    """Batches of indices into ``items`` (each item is its bucket key), every batch from one bucket.

    The order depends only on (seed, epoch), so a resumed run sees the same batches. The last,
    short batch of a bucket is kept unless ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = np.random.default_rng([seed % 2**63, epoch])  # SeedSequence wants non-negative ints
    groups: Dict[Hashable, List[int]] = {}
    for index, key in enumerate(items):
        groups.setdefault(key, []).append(index)
    batches: List[List[int]] = []
    for key in sorted(groups, key=repr):  # dict order follows the data; sort for determinism
        indices = groups[key]
        order = [indices[i] for i in rng.permutation(len(indices))]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]
