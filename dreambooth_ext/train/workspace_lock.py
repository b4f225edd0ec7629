"""One run per workspace: a lock file holding the owner's pid, host and start time.

A lock whose process is gone (a crash, a kill -9) is stale and taken over; a lock of a live
process, or of another machine sharing the folder, refuses the second run with one sentence.
"""

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from dreambooth_ext.atomic import create_new
from dreambooth_ext.bridge.temporaries import pid_alive
from dreambooth_ext.errors import UserError

LOCK_NAME = "run.lock"
_HELD = set()  # workspaces this process holds: a second thread of the same process is refused too
_HELD_INFO = {}  # workspace -> what its lock file says, for the message
_HELD_LOCK = threading.Lock()


def lock_path(workspace: Path) -> Path:
    return Path(workspace) / LOCK_NAME


def _read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def holder(workspace: Path) -> Optional[dict]:
    """The live owner of the workspace's lock, or None when it is free or stale."""
    key = str(Path(workspace).resolve())
    with _HELD_LOCK:
        if key in _HELD:
            return dict(_HELD_INFO.get(key, {"pid": os.getpid(), "host": socket.gethostname()}))
    return _file_holder(lock_path(workspace))


def _file_holder(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    info = _read(path)
    if info is None:
        return None  # killed while writing it: nobody holds it
    if info.get("host") != socket.gethostname():
        return info  # another machine's process: it cannot be checked from here
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or not pid_alive(pid):
        return None
    started = process_start_time(pid)
    if started is not None and isinstance(info.get("started"), (int, float)) and started > info["started"] + 2:
        return None  # that process id now belongs to a process that began after the lock was written
    return info


def process_start_time(pid: int) -> Optional[float]:
    """When a process began (seconds since the epoch), where /proc tells; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def busy_message(name: str, workspace: Path, info: dict) -> str:
    since = ""
    if isinstance(info.get("started"), (int, float)) and info["started"] > 0:
        since = " since " + time.strftime("%Y-%m-%d %H:%M", time.localtime(info["started"]))
    elsewhere = ""
    if info.get("host") != socket.gethostname():  # its process cannot be checked from this machine
        elsewhere = f"; if nothing runs on {info.get('host')}, delete that lock file"
    holder_name = info.get("name") if isinstance(info.get("name"), str) else name
    return (f"'{holder_name}' is already training in {workspace} (process {info.get('pid')} on {info.get('host')}"
            f"{since}, lock {lock_path(workspace)}); wait for it to end, or give this run another name{elsewhere}.")


def check_free(name: str, workspace: Path) -> None:
    info = holder(workspace)
    if info is not None:
        raise UserError(busy_message(name, workspace, info))


@contextlib.contextmanager
def workspace_lock(name: str, workspace: Path) -> Iterator[None]:
    """Hold the workspace for the duration of a run; refuse if another live run holds it."""
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    key = str(workspace.resolve())
    with _HELD_LOCK:
        if key in _HELD:
            raise UserError(busy_message(name, workspace, _HELD_INFO.get(key, {})))
        _HELD.add(key)
        _HELD_INFO[key] = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "name": name}
    try:
        _acquire(name, workspace)
        try:
            yield
        finally:
            _release(workspace)
    finally:
        with _HELD_LOCK:
            _HELD.discard(key)
            _HELD_INFO.pop(key, None)


def _acquire(name: str, workspace: Path) -> None:
    path = lock_path(workspace)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "name": name}
    for _ in range(3):
        # creates the lock with its content in one step, or finds one there
        if create_new(path, json.dumps(mine), "the lock file"):
            return
        live = _file_holder(path)
        if live is not None:
            raise UserError(busy_message(name, workspace, live))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: its process is gone
    raise UserError(f"Could not take the lock {path}; another run keeps taking it. Try again.")


def _release(workspace: Path) -> None:
    path = lock_path(workspace)
    info = _read(path)
    if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        with contextlib.suppress(OSError):
            path.unlink()
