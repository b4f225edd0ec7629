"""Synthetic captioned pictures the tiny drawn base model learned from, and measures against them.

Coloured shapes ("a red circle") and simple characters ("a character with a green hat") on
light backgrounds, drawn with PIL from a seed: the builder (tools/build_tiny_base.py) trains on
them, and the tests and the demo compare generations with them. The bundled sks_pixarstyle
character (orange head, teal eyes, purple sweater, blue background) is none of these.
"""

import random
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

SIZE = 64
SS = 4  # drawn at 4x and scaled down once: cheap anti-aliasing
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 215), "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
CLASS_CAPTION = "a character"
SHAPE_CAPTIONS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
HAT_CAPTIONS = [f"a character with a {c} hat" for c in COLOURS]
CAPTIONS = SHAPE_CAPTIONS + HAT_CAPTIONS + [CLASS_CAPTION]
SKINS = [(250, 224, 196), (236, 196, 160), (198, 150, 110)]
SHIRTS = [(120, 120, 120), (150, 110, 70), (60, 140, 140), (90, 90, 60)]


def _jitter(rng: random.Random, rgb, amount: int = 18):
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def _background(rng: random.Random):
    v = rng.randint(228, 255)
    return (v, v - rng.randint(0, 8), v - rng.randint(0, 8))


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, colour, shape: str):
    r = rng.uniform(13, 19) * SS
    cx, cy = (SIZE / 2 + rng.uniform(-5, 5)) * SS, (SIZE / 2 + rng.uniform(-5, 5)) * SS
    fill = _jitter(rng, colour)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r * 1.1, cy + r * 0.8), (cx + r * 1.1, cy + r * 0.8)], fill=fill)


def _character(draw: ImageDraw.ImageDraw, rng: random.Random, hat):
    """A round head on a shirt, with a brimmed hat when `hat` is a colour."""
    cx = (SIZE / 2 + rng.uniform(-4, 4)) * SS
    head_r = rng.uniform(10, 12.5) * SS
    head_y = (SIZE / 2 + rng.uniform(-1, 3)) * SS
    shirt = _jitter(rng, rng.choice(SHIRTS), 10)
    draw.rounded_rectangle([cx - 15 * SS, head_y + head_r * 0.7, cx + 15 * SS, SIZE * SS + 4 * SS],
                           radius=6 * SS, fill=shirt)
    draw.ellipse([cx - head_r, head_y - head_r, cx + head_r, head_y + head_r], fill=rng.choice(SKINS))
    eye_y, ink = head_y - head_r * 0.1, (30, 30, 30)
    for side in (-1, 1):
        ex = cx + side * head_r * 0.38
        draw.ellipse([ex - 1.6 * SS, eye_y - 1.6 * SS, ex + 1.6 * SS, eye_y + 1.6 * SS], fill=ink)
    draw.arc([cx - head_r * 0.4, head_y, cx + head_r * 0.4, head_y + head_r * 0.55], 20, 160, fill=ink, width=SS)
    if hat is not None:
        fill = _jitter(rng, hat, 12)
        top = head_y - head_r * 0.55
        draw.rectangle([cx - head_r * 1.35, top - 2.2 * SS, cx + head_r * 1.35, top + 0.5 * SS], fill=fill)
        draw.rectangle([cx - head_r * 0.8, top - 11 * SS, cx + head_r * 0.8, top], fill=fill)


def draw(caption: str, seed: int) -> Image.Image:
    """One SIZE x SIZE picture of `caption` (one of CAPTIONS), the same for the same seed."""
    rng = random.Random(f"{caption}|{seed}")
    img = Image.new("RGB", (SIZE * SS, SIZE * SS), _background(rng))
    canvas = ImageDraw.Draw(img)
    words = caption.split()
    if caption == CLASS_CAPTION:
        _character(canvas, rng, rng.choice([None] + list(COLOURS.values())))
    elif words[1] == "character":
        _character(canvas, rng, COLOURS[words[4]])
    else:
        _shape(canvas, rng, COLOURS[words[1]], words[2])
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def pictures(caption: str, seeds: Sequence[int]) -> List[Image.Image]:
    return [draw(caption, s) for s in seeds]


REFERENCE_SEEDS = range(30_000, 30_008)  # seeds the builder did not train on


def _small(img: Image.Image):
    import numpy as np

    # 16x16 box averages: shapes and colours, not the VAE's blur (the builder's confusion table compares so too)
    return np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).reduce(4), dtype=np.float32).ravel()


@lru_cache(maxsize=1)
def _caption_references():
    """(labels, 16x16 pictures) of every caption at REFERENCE_SEEDS, drawn once per process."""
    import numpy as np

    labels = tuple(c for c in CAPTIONS for _s in REFERENCE_SEEDS)
    return labels, np.stack([_small(draw(c, s)) for c in CAPTIONS for s in REFERENCE_SEEDS])


def nearest_labels(images: Sequence[Image.Image], extra: Dict[str, Sequence[Image.Image]] = None) -> List[str]:
    """For each picture, the label of the nearest reference: a caption, for drawn pictures of every caption
    at REFERENCE_SEEDS, or a key of `extra` (say the instance pictures of a new concept)."""
    import numpy as np

    caption_labels, caption_refs = _caption_references()
    labels, refs = list(caption_labels), [caption_refs]
    for label, group in (extra or {}).items():
        labels += [label] * len(group)
        refs.append(np.stack([_small(img) for img in group]))
    refs = np.concatenate(refs)
    return [labels[int(((refs - _small(img)) ** 2).sum(axis=1).argmin())] for img in images]
