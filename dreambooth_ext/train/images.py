"""Reading training images: any common mode or orientation in, 8-bit RGB out; bad files named, not fatal.

Warnings (skipped files, small images) go through the ``warn`` callback of ``check_instance_folder``,
which defaults to this module's logger, so the CLI logs them and the tab can collect them.
"""

import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth_ext.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Files that live beside images and are not worth a warning: captions and OS clutter.
QUIET_SUFFIXES = (".txt",)
QUIET_NAMES = ("thumbs.db", "desktop.ini")
IMAGE_KINDS = "PNG, JPEG, WebP, BMP or TIFF"
LIST_IN_MESSAGE = 5

Skipped = Tuple[Path, str]


class BadImage(Exception):
    """A file that cannot be used as an image; ``reason`` is a few words for a list of skipped files."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{Path(path).name}: {reason}")
        self.path = Path(path)
        self.reason = reason


def load_image(path) -> Image.Image:
    """Decode ``path`` fully and return it as 8-bit RGB, upright, transparency flattened onto white."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode every pixel now so truncation surfaces here, not mid-training
            return _to_rgb(_upright(img), path)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(path, "missing") from None
    except PermissionError:
        raise BadImage(path, "no permission to read it") from None
    except UnidentifiedImageError:
        raise BadImage(path, "empty file" if _is_empty(path) else "not an image or corrupt") from None
    except Image.DecompressionBombError:
        raise BadImage(path, "too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(path, _reason(e)) from None


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _reason(error: Exception) -> str:
    text = str(error).lower()
    if "truncat" in text or isinstance(error, EOFError):
        return "truncated"
    return "corrupt"


def _upright(img: Image.Image) -> Image.Image:
    # A broken EXIF block should not cost the picture: use it as stored.
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "no usable orientation"
        return img


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Map every mode Pillow hands out to RGB, scaling high bit depths instead of clipping them."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()
    try:
        return img.convert("RGB")  # L, P, CMYK, YCbCr, 1
    except (ValueError, OSError):
        raise BadImage(path, f"unsupported colour mode {mode}") from None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit or float image scaled into 0..255."""
    values = values.astype(np.float64)
    if mode == "F":
        # Float images are either 0..1 or already 0..255; anything else is clipped.
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        values = values * scale
    elif mode == "I" and values.size and values.max() > 65535:
        values = values * (255.0 / values.max())  # a true 32-bit image: stretch its range
    else:
        # I;16* and "I" (how older Pillow opens 16-bit PNG) hold 0..65535; 65535 / 257 = 255.
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _probe(path: Path) -> Tuple[int, int]:
    """Decode a file once to prove it usable; return its upright size."""
    return load_image(path).size


def scan_folder(folder) -> Tuple[List[Tuple[Path, Tuple[int, int]]], List[Skipped]]:
    """Like ``list_images`` but keeps each good image's upright (width, height)."""
    folder = Path(folder)
    good: List[Tuple[Path, Tuple[int, int]]] = []
    skipped: List[Skipped] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = path.name
        if name.startswith(".") or name.lower() in QUIET_NAMES:
            continue
        if path.is_dir():
            skipped.append((path, "a folder; images in subfolders are not read"))
            continue
        suffix = path.suffix.lower()
        if suffix in QUIET_SUFFIXES:
            continue
        if suffix not in IMAGE_SUFFIXES:
            skipped.append((path, f"not a {IMAGE_KINDS} image"))
            continue
        try:
            good.append((path, _probe(path)))
        except BadImage as e:
            skipped.append((path, e.reason))
    return good, skipped


def list_images(folder) -> Tuple[List[Path], List[Skipped]]:
    """Images in ``folder`` (not its subfolders) that decode, sorted by name, and (file, reason) for the rest.

    Caption ``.txt`` files and hidden files are passed over silently.
    """
    good, skipped = scan_folder(folder)
    return [path for path, _ in good], skipped


def describe_skipped(skipped: Sequence[Skipped]) -> str:
    """'3 files skipped: a.jpg (corrupt), b.json (not ...), ...' with at most a few names."""
    shown = ", ".join(f"{path.name} ({reason})" for path, reason in skipped[:LIST_IN_MESSAGE])
    more = len(skipped) - LIST_IN_MESSAGE
    if more > 0:
        shown += f" and {more} more"
    noun = "file" if len(skipped) == 1 else "files"
    return f"{len(skipped)} {noun} skipped: {shown}"


def check_instance_folder(
    folder,
    min_side: int = 512,
    label: str = "instance image folder",
    warn: Optional[Callable[[str], None]] = None,
) -> List[Path]:
    """The usable images of a concept folder, or a UserError saying what to fix.

    Skipped files and images whose shorter side is below ``min_side`` (usually the training
    resolution) are reported through ``warn`` (default: this module's logger), one message each kind.
    """
    warn = warn or logger.warning
    folder = Path(folder)
    if not folder.exists():
        raise UserError(
            f"The {label} {folder} does not exist; check the path, or create it and put the images in it."
        )
    if not folder.is_dir():
        raise UserError(
            f"The {label} {folder} is a file, not a folder; give the folder that holds the images."
        )
    good, skipped = scan_folder(folder)
    if not good and skipped:
        raise UserError(
            f"The {label} {folder} has no usable images ({describe_skipped(skipped)}); "
            f"replace them with {IMAGE_KINDS} images."
        )
    if not good:
        raise UserError(f"The {label} {folder} has no images; put {IMAGE_KINDS} images in it.")
    if skipped:
        warn(f"{folder}: {describe_skipped(skipped)}; training goes on with the other {len(good)} images.")
    small = [(path, size) for path, size in good if min(size) < min_side]
    if small:
        warn(_small_message(folder, small, min_side))
    return [path for path, _ in good]


def _small_message(folder: Path, small, min_side: int) -> str:
    shown = ", ".join(f"{path.name} {w}x{h}" for path, (w, h) in small[:LIST_IN_MESSAGE])
    if len(small) > LIST_IN_MESSAGE:
        shown += f" and {len(small) - LIST_IN_MESSAGE} more"
    return (
        f"{folder}: {len(small)} images are smaller than {min_side} px on their shorter side ({shown}); "
        "they are used, but upscaled to the training resolution (or, with aspect-ratio bucketing, given "
        "a smaller bucket) and may look soft."
    )
