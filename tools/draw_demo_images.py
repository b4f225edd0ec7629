"""Draw the bundled demo concept: one cartoon character ("sks_pixarstyle") in six poses, with captions.

Usage: python tools/draw_demo_images.py [--out DIR]
Writes PNGs and a .txt caption beside each into dreambooth_ext/data/demo/instance/ by default.
Pure PIL and a fixed seed, so re-running gives the same pictures; no downloaded or copyrighted art.

The character: a round orange head with big teal eyes, rosy cheeks, a red top hat with a yellow
band and a purple sweater. Poses vary the background, position, size, tilt, gaze and expression.
"""

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "dreambooth_ext" / "data" / "demo" / "instance"
SEED = 1234
SS = 4  # drawn at 4x and scaled down once: cheap anti-aliasing
CANVAS = 400  # the character's own square canvas, before scaling

SKIN = (245, 160, 58)
SKIN_DARK = (196, 110, 32)
CHEEK = (240, 110, 110)
IRIS = (32, 150, 140)
INK = (40, 30, 30)
HAT = (200, 40, 45)
HAT_DARK = (140, 25, 30)
BAND = (250, 205, 60)
SWEATER = (110, 75, 180)
SWEATER_DARK = (80, 52, 140)
MOUTH = (120, 30, 40)
TONGUE = (235, 105, 115)


@dataclass
class Pose:
    name: str
    size: Tuple[int, int]  # final image (w, h)
    background: Tuple[int, int, int]
    background_name: str
    center: Tuple[float, float]  # character centre, as fractions of the image
    scale: float  # character height, as a fraction of the image height
    tilt: float  # degrees, counter-clockwise
    gaze: float  # -1 left .. 1 right
    expression: str  # smiling, grinning, surprised, winking


POSES = (
    Pose("pose1", (128, 128), (120, 175, 235), "blue", (0.5, 0.52), 0.95, 0, 0.0, "smiling"),
    Pose("pose2", (128, 128), (250, 225, 130), "yellow", (0.42, 0.55), 0.8, 12, 0.7, "grinning"),
    Pose("pose3", (128, 128), (150, 210, 150), "green", (0.58, 0.6), 0.7, -10, -0.8, "surprised"),
    Pose("pose4", (128, 128), (245, 185, 205), "pink", (0.5, 0.55), 0.85, 6, 0.0, "winking"),
    Pose("pose5", (160, 128), (190, 170, 230), "lavender", (0.33, 0.55), 0.85, -6, 0.9, "smiling"),
    Pose("pose6", (128, 160), (200, 200, 205), "grey", (0.5, 0.6), 0.65, 0, -0.4, "grinning"),
)


def box(cx: float, cy: float, rx: float, ry: float):
    return (cx - rx, cy - ry, cx + rx, cy + ry)


def draw_character(pose: Pose) -> Image.Image:
    """The character on a transparent CANVAS x CANVAS square, feet at the bottom edge."""
    c = CANVAS
    layer = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    outline = 5
    # A short, round body in a sweater, with mitten hands, kept inside the canvas so tilting shows no cut.
    for side in (-1, 1):
        hand = box(c * 0.5 + side * c * 0.25, c * 0.86, c * 0.06, c * 0.06)
        d.ellipse(hand, fill=SKIN, outline=SKIN_DARK, width=outline)
    body = (c * 0.27, c * 0.73, c * 0.73, c * 0.97)
    d.rounded_rectangle(body, radius=c * 0.11, fill=SWEATER, outline=SWEATER_DARK, width=outline)
    d.rectangle((c * 0.43, c * 0.72, c * 0.57, c * 0.78), fill=SKIN)  # neck
    hx, hy, hr = c * 0.5, c * 0.5, c * 0.27
    d.ellipse(box(hx, hy, hr, hr * 0.96), fill=SKIN, outline=SKIN_DARK, width=outline)
    draw_face(d, hx, hy, hr, pose)
    draw_hat(d, hx, hy - hr * 0.78, hr)
    return layer


def draw_face(d: ImageDraw.ImageDraw, hx: float, hy: float, hr: float, pose: Pose) -> None:
    eye_y, eye_dx, eye_r = hy - hr * 0.08, hr * 0.38, hr * 0.3
    for side in (-1, 1):
        ex = hx + side * eye_dx
        d.ellipse(box(ex - side * hr * 0.02, hy + hr * 0.38, hr * 0.14, hr * 0.08), fill=CHEEK)
        if pose.expression == "winking" and side == 1:
            d.arc(box(ex, eye_y, eye_r * 0.8, eye_r * 0.5), 200, 340, fill=INK, width=6)
            continue
        d.ellipse(box(ex, eye_y, eye_r * 0.85, eye_r), fill=(255, 255, 255), outline=INK, width=4)
        px = ex + pose.gaze * eye_r * 0.35
        d.ellipse(box(px, eye_y + eye_r * 0.1, eye_r * 0.5, eye_r * 0.55), fill=IRIS)
        d.ellipse(box(px, eye_y + eye_r * 0.1, eye_r * 0.26, eye_r * 0.3), fill=INK)
        glint = box(px + eye_r * 0.15, eye_y - eye_r * 0.1, eye_r * 0.12, eye_r * 0.12)
        d.ellipse(glint, fill=(255, 255, 255))
        brow_y = eye_y - eye_r * (1.45 if pose.expression == "surprised" else 1.25)
        d.arc(box(ex, brow_y + eye_r * 0.4, eye_r * 0.7, eye_r * 0.4), 210, 330, fill=SKIN_DARK, width=7)
    d.ellipse(box(hx, hy + hr * 0.22, hr * 0.1, hr * 0.07), fill=SKIN_DARK)  # nose
    mouth_y = hy + hr * 0.5
    if pose.expression == "surprised":
        d.ellipse(box(hx, mouth_y + hr * 0.04, hr * 0.11, hr * 0.14), fill=MOUTH)
    elif pose.expression == "grinning":
        d.chord(box(hx, mouth_y - hr * 0.1, hr * 0.32, hr * 0.28), 0, 180, fill=MOUTH)
        d.chord(box(hx, mouth_y + hr * 0.1, hr * 0.16, hr * 0.1), 180, 360, fill=TONGUE)
        teeth = (hx - hr * 0.22, mouth_y - hr * 0.1, hx + hr * 0.22, mouth_y - hr * 0.02)
        d.rectangle(teeth, fill=(255, 255, 255))
    else:
        d.arc(box(hx, mouth_y - hr * 0.1, hr * 0.28, hr * 0.2), 20, 160, fill=MOUTH, width=7)


def draw_hat(d: ImageDraw.ImageDraw, hx: float, brim_y: float, hr: float) -> None:
    """A red top hat sitting on the head, yellow band."""
    d.ellipse(box(hx, brim_y, hr * 0.95, hr * 0.2), fill=HAT, outline=HAT_DARK, width=5)
    top, bottom = brim_y - hr * 0.95, brim_y
    crown = (hx - hr * 0.55, top, hx + hr * 0.55, bottom)
    d.rounded_rectangle(crown, radius=hr * 0.12, fill=HAT, outline=HAT_DARK, width=5)
    d.rectangle((hx - hr * 0.53, bottom - hr * 0.3, hx + hr * 0.53, bottom - hr * 0.12), fill=BAND)
    d.ellipse(box(hx, brim_y - hr * 0.02, hr * 0.55, hr * 0.08), fill=HAT)  # hides the crown's bottom line


def render(pose: Pose, rng: random.Random) -> Image.Image:
    w, h = pose.size[0] * SS, pose.size[1] * SS
    image = Image.new("RGBA", (w, h), pose.background + (255,))
    side = int(h * pose.scale)
    figure = draw_character(pose).resize((side, side), Image.LANCZOS).rotate(pose.tilt, Image.BICUBIC)
    # A little seeded jitter so no two placements are exactly the table's numbers.
    cx = w * pose.center[0] + rng.uniform(-2, 2) * SS
    cy = h * pose.center[1] + rng.uniform(-2, 2) * SS
    shadow = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    ImageDraw.Draw(shadow).ellipse(box(cx, cy + side * 0.48, side * 0.3, side * 0.05), fill=(0, 0, 0, 40))
    image = Image.alpha_composite(image, shadow)
    image.alpha_composite(figure, (int(cx - side / 2), int(cy - side / 2)))
    return image.convert("RGB").resize(pose.size, Image.LANCZOS)


def caption(pose: Pose) -> str:
    return f"sks_pixarstyle character, {pose.expression}, {pose.background_name} background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    for pose in POSES:
        path = args.out / f"{pose.name}.png"
        render(pose, rng).save(path, optimize=True)
        path.with_suffix(".txt").write_text(caption(pose) + "\n", encoding="utf-8")
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
