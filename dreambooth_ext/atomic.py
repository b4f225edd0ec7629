"""Writing a file or folder so that a reader finds the old copy or the new one, never half of one.

Every writer of the package goes through here: the new copy is written to a temporary sibling
`.NAME.partial-PID`, then renamed over NAME. A failure removes the temporary and becomes one
sentence naming the file (a full disk, a read-only folder, any other OS error); a temporary that a
killed process left is removed at the next start (bridge/temporaries.py reads these names).
"""

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from dreambooth_ext.errors import UserError

PARTIAL = "partial"  # .NAME.partial-PID: a copy being written
PREVIOUS = "previous"  # .NAME.previous-PID: the old copy of a folder, until the new one is in place


def temp_sibling(path: Path) -> Path:
    """Where the new copy of `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.{PARTIAL}-{os.getpid()}")


def aside_sibling(path: Path) -> Path:
    """Where a folder being replaced waits until its successor is in place."""
    return path.with_name(f".{path.name}.{PREVIOUS}-{os.getpid()}")


_WRITE_FAILURE_TEXT = ("no space left", "storagefull", "code: 28", "write failed", "unexpected pos", "disk quota")


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save and safetensors wrap the OS error in their own exception types
    return not isinstance(e, (OSError, UserError)) and any(t in str(e).lower() for t in _WRITE_FAILURE_TEXT)


def write_failure(path: Path, e: BaseException, existed: bool, what: str = "") -> Optional[UserError]:
    """The one sentence for a failed write of `path`, or None when `e` is not a write failure.

    `what` names the kind of file for the reader ("the sample image")."""
    path = Path(path)
    what = f"{what} " if what else ""
    before = "the previous one is unchanged" if existed else "nothing was written there"
    if _is_disk_full(e):
        free = shutil.disk_usage(existing_parent(path)).free
        return UserError(f"The disk filled up while writing {what}{path.name} ({free / 2**30:.1f} GiB free in "
                         f"{path.parent}); {before}. Free some space and run it again.")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"{what}{path} cannot be written ({e.strerror or e}; the folder is read-only or not yours); "
                         f"{before}. Choose another folder or fix its permissions.")
    if isinstance(e, OSError):
        return UserError(f"Writing {what}{path} failed ({e.strerror or e}); {before}.")
    return None


def existing_parent(path: Path) -> Path:
    """The nearest folder above `path` that exists (the working folder when none does)."""
    for p in [path.parent, *path.parent.parents]:
        if p.exists():
            return p
    return Path.cwd()


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], what: str = "") -> Iterator[Path]:
    """Yield a temporary sibling to write to; put it at `path` only when the block succeeds.

    A failure removes the temporary and is raised as write_failure's sentence (`what`: see there).

    A folder being replaced is renamed aside first and deleted only after the new one is in
    place, so one complete copy is on disk at every moment (see temporaries.recover_aside).
    """
    path = Path(path)
    existed = path.exists()
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        yield tmp
        if path.is_dir() and not path.is_symlink():
            aside = aside_sibling(path)
            remove(aside)
            os.replace(path, aside)  # os.replace cannot overwrite a non-empty folder
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside, path)
                raise
            quiet_remove(aside)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        quiet_remove(tmp)
        failure = write_failure(path, e, existed, what) if isinstance(e, Exception) else None
        if failure is not None:
            raise failure from None
        raise


def write_text(path: Union[str, os.PathLike], text: str, what: str = "") -> Path:
    """Replace the file at `path` with `text` (UTF-8), atomically."""
    path = Path(path)
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_png(path: Union[str, os.PathLike], image, pnginfo=None, what: str = "") -> Path:
    """Replace the file at `path` with a PIL `image` as PNG (with `pnginfo`'s text chunks), atomically."""
    path = Path(path)
    with atomic_path(path, what) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
    return path


def create_new(path: Union[str, os.PathLike], text: str, what: str = "") -> bool:
    """Create `path` holding `text` (UTF-8) only if nothing is there; False when something is.

    Complete or absent at every moment: the text goes to a temporary, which is hard-linked to
    `path` (the link fails if a file appeared meanwhile). On a filesystem without hard links the
    file is created exclusively and then written.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        try:
            tmp.write_text(text, encoding="utf-8")
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:
                pass  # no hard links here
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            return True
        except OSError as e:
            raise write_failure(path, e, False, what) from None
    finally:
        quiet_remove(tmp)


def remove(p: Path) -> None:
    """Remove a file, link or folder tree if it is there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def quiet_remove(p: Path) -> bool:
    """remove, never raising (a read-only folder: a cleanup must not hide the real error); False when
    something is left."""
    try:
        remove(p)
    except OSError:
        return False
    return not (p.exists() or p.is_symlink())

