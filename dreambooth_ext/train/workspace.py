"""A run's hold on its workspace: the lock, and tidying what killed runs left behind."""

import contextlib
import os
from typing import Iterator

from dreambooth_ext.train import state as st


def secondary_process() -> bool:
    """A process other than the first of an `accelerate launch` run: the first one holds the lock."""
    try:
        return int(os.environ.get("RANK", "0") or 0) > 0
    except ValueError:
        return False


def tidy(cfg, reporter) -> None:
    """Put back a state a kill left aside, and remove temporaries whose writer is gone."""
    from dreambooth_ext.bridge.temporaries import recover_aside, remove_stale

    workspace = cfg.workspace_path()
    if recover_aside(st.state_dir(workspace)) is not None:
        reporter.stage(f"put back the training state a stopped save left aside in {workspace}")
    recover_aside(workspace / "base" / "model")
    folders = {cfg.checkpoint_path(), cfg.lora_path(), workspace, workspace / "base"}
    removed = [p for folder in sorted(folders, key=str) for p in remove_stale(folder)]
    if removed:
        reporter.stage(f"removed {len(removed)} temporary files that stopped runs left (e.g. {removed[0].name})")


@contextlib.contextmanager
def hold_workspace(cfg, reporter) -> Iterator[None]:
    from dreambooth_ext.train.workspace_lock import workspace_lock

    if secondary_process():
        yield
        return
    with workspace_lock(cfg.name, cfg.workspace_path()):
        tidy(cfg, reporter)
        yield
