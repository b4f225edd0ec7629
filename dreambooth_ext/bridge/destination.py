"""Where a conversion may write: never over its own source, and only over the same kind of output.

Checked before any conversion work: the same path or one inside the other, an existing
destination without --overwrite, a destination that is not a diffusers folder or a checkpoint
file (a folder of someone's files is never deleted), and a folder that cannot be written.
"""

import os
from pathlib import Path

from dreambooth_ext.atomic import existing_parent
from dreambooth_ext.errors import UserError
from dreambooth_ext.paths import within


def check_destination(src, dst, overwrite: bool, kind: str) -> None:
    """kind: 'folder' (a diffusers folder is written) or 'file' (a single checkpoint is written)."""
    from dreambooth_ext.bridge.tensor_io import sniff_format

    src, dst = Path(src), Path(dst)
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise UserError(f"The destination {dst} is the source itself; choose another destination.")
    if within(d, s):
        raise UserError(f"The destination {dst} is inside the source {src}; choose a destination outside it.")
    if within(s, d):
        raise UserError(f"The source {src} is inside the destination {dst}, which a conversion would replace; "
                        "choose another destination.")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise UserError(f"{dst} already exists; pass --overwrite to replace it, or choose another destination.")
        if kind == "folder" and not (dst.is_dir() and not dst.is_symlink() and (dst / "model_index.json").is_file()):
            raise UserError(f"{dst} is not a diffusers model folder (no model_index.json), so it is never replaced; "
                            "choose another destination.")
        if kind == "file" and not (dst.is_file() and not dst.is_symlink()
                                   and sniff_format(dst) in ("safetensors", "zip", "pickle")):
            raise UserError(f"{dst} is not a checkpoint file, so it is never replaced; choose another destination.")
    parent = existing_parent(dst)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{dst} cannot be written: {parent} is read-only or not yours; choose another destination.")
