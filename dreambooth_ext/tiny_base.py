"""The shipped tiny drawn base: a small SD1 model that learned the pictures in `drawn.py`.

tools/build_tiny_base.py trains it (from a seed, on a CPU) and writes SHIPPED; `install` puts a
copy where the WebUI or the demo reads checkpoints, with the beside-yaml and the local CLIP
folder its yaml names (a yaml's `version` is resolved against the WebUI's working folder, so the
installed yaml names that folder by its absolute path).
"""

import shutil
import tempfile
from pathlib import Path

from dreambooth_ext.tiny import tiny_family

NAME = "tiny-sd1-drawn"
SHIPPED = Path(__file__).resolve().parent / "data" / "tiny_base" / f"{NAME}.safetensors"
CLIP_PLACEHOLDER = "CLIP_FOLDER"  # the shipped yaml's `version`, replaced on install
UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "sample_size": 8, "attention_head_dim": 2}
# 64 channels at the full-size level: the decoder's last GroupNorm has 32 groups (fixed in the LDM
# code), and with one channel per group it zeroes each channel's mean over the picture, so every
# decoded picture came out with the same mean colour (backgrounds and hues were lost)
VAE = {"sample_size": 64, "block_out_channels": [64, 64, 64, 64]}


def drawn_family() -> dict:
    """The family dict of the drawn base (its VAE scaling factor is set by the builder)."""
    fam = tiny_family("sd1")
    fam["description"] = "tiny SD1 trained on drawn shapes and characters (tools/build_tiny_base.py)"
    fam["unet"].update(UNET)
    fam["vae"].update(VAE)
    return fam


def is_current(dest: Path) -> bool:
    """Whether `dest` holds the shipped base as this version ships it (a checkout that ran the demo
    before an update holds the earlier build, and would go on training from it)."""
    import filecmp

    dest = Path(dest)
    return dest.is_file() and dest.with_suffix(".yaml").is_file() and filecmp.cmp(dest, SHIPPED, shallow=False)


def short_hash(path: Path = SHIPPED) -> str:
    """8 hex digits of a file's SHA-256 (the shipped base's names the demo's class-image folder)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


def install(dest: Path, source: Path = None) -> Path:
    """Copy the shipped base (or a build at `source`) to `dest` (a .safetensors path) with its yaml and
    CLIP folder; returns dest."""
    import transformers

    from dreambooth_ext.bridge import single_file_to_diffusers
    from dreambooth_ext.bridge.components import TEXT_ENCODER
    from dreambooth_ext.tiny import write_clip_folder

    dest = Path(dest)
    shipped = Path(source) if source else SHIPPED
    if not shipped.is_file():
        raise FileNotFoundError(f"{shipped} is missing; rebuild it with `python tools/build_tiny_base.py`.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clip = dest.parent / f"{dest.stem}.clip"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(shipped.with_suffix(".yaml"), Path(tmp) / f"{NAME}.yaml")
        shutil.copyfile(shipped, Path(tmp) / f"{NAME}.safetensors")
        # the shipped CLIP folder holds only the config (the weights are in the checkpoint): point
        # the yaml at it to read the text encoder out through the bridge, then write a full folder
        shutil.copytree(shipped.parent / f"{shipped.stem}.clip", Path(tmp) / "clip")
        _set_version(Path(tmp) / f"{NAME}.yaml", str(Path(tmp) / "clip"))
        folder = Path(tmp) / "diffusers"
        single_file_to_diffusers(Path(tmp) / f"{NAME}.safetensors", folder, progress=lambda _m: None)
        encoder = transformers.CLIPTextModel.from_pretrained(str(folder / TEXT_ENCODER))
        write_clip_folder(encoder, "<|endoftext|>", clip)
    shutil.copyfile(shipped, dest)
    shutil.copyfile(shipped.with_suffix(".yaml"), dest.with_suffix(".yaml"))
    _set_version(dest.with_suffix(".yaml"), str(clip.resolve()))
    return dest


def _set_version(yaml_path: Path, folder: str):
    yaml_path.write_text(yaml_path.read_text().replace(CLIP_PLACEHOLDER, folder))
