"""What a path is once symlinks and '..' are followed, and whether it lies in a folder.

Every "is this inside that folder" question of the package is `within` (or `within_any`): the
folder itself counts as inside, and both sides are resolved first, so a symlink or '..' cannot
lead out of a folder (nor in).
"""

from pathlib import Path
from typing import Iterable

from dreambooth_ext.errors import UserError


def resolved(path) -> Path:
    """The absolute path with ~, symlinks and '..' followed; UserError for a name no file system accepts."""
    text = str(path)
    if "\x00" in text:
        raise UserError(f"The path {text!r} contains a NUL character; type the path again without it.")
    try:
        return Path(text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long
        raise UserError(f"The path {text!r} cannot be used ({e.__class__.__name__}); give another one.") from None


def within(path, folder) -> bool:
    """True when `path` is `folder` or lies below it, both resolved."""
    target, root = resolved(path), resolved(folder)
    return target == root or root in target.parents


def within_any(path, folders: Iterable) -> bool:
    """True when `path` is one of `folders` or lies below one."""
    return any(within(path, folder) for folder in folders)
