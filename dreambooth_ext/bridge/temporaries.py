"""What killed writers leave behind: `.NAME.partial-PID` temporaries and `.NAME.previous-PID` asides.

A temporary of a process that is gone is stale and removed at the next start; one of a live
process is never touched. An aside is the complete previous copy of a folder that was being
replaced: when the folder itself is missing (a kill between the two renames) the aside is put
back, otherwise it is stale like any temporary.
"""

import os
import re
from pathlib import Path
from typing import List, Optional

from dreambooth_ext.atomic import PARTIAL, PREVIOUS, quiet_remove

_PATTERN = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>{PARTIAL}|{PREVIOUS})-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Is a process with this id running on this machine? (Unknown counts as alive: the safe side.)"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _leftovers(folder: Path):
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for name in names:
        m = _PATTERN.match(name)
        if m:
            out.append((Path(folder) / name, m.group("name"), m.group("kind"), int(m.group("pid"))))
    return out


def left_aside(path: Path) -> Optional[Path]:
    """The newest aside of `path` whose writer is gone, if any."""
    path = Path(path)
    asides = [p for p, name, kind, pid in _leftovers(path.parent)
              if name == path.name and kind == PREVIOUS and not pid_alive(pid)]
    return max(asides, key=lambda p: p.stat().st_mtime) if asides else None


def recover_aside(path: Path) -> Optional[Path]:
    """Put back the previous copy of `path` if a kill left only the aside; returns the aside used."""
    path = Path(path)
    if path.exists():
        return None
    aside = left_aside(path)
    if aside is not None:
        os.replace(aside, path)
    return aside


def remove_stale(folder: Path, only: Optional[str] = None) -> List[Path]:
    """Remove the temporaries and asides in `folder` whose process is gone; returns what was removed.

    `only`: just those of this file name. Call recover_aside first for folders that may be
    missing their current copy.
    """
    removed = []
    for p, name, kind, pid in _leftovers(Path(folder)):
        if pid_alive(pid) or (only is not None and name != only):
            continue
        if kind == PREVIOUS and not (Path(folder) / name).exists():
            continue  # the only copy left: keep it for recover_aside
        if quiet_remove(p):
            removed.append(p)
    return removed
