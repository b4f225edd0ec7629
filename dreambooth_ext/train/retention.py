"""keep_last_models: only the newest N saves of a run stay; older ones the run wrote itself are deleted.

A save at step S is every NAME_<S> file the run wrote: the LoRA, the checkpoint, its yaml and the
LoRA's card file. Only files the owned-file record says this run wrote (and nobody changed since)
are ever deleted; a user's file that happens to match the name pattern is left alone.
"""

from pathlib import Path
from typing import Dict, List

from dreambooth_ext.bridge import CHECKPOINT_SUFFIXES
from dreambooth_ext.train.owned_files import owned, read_record, saved_names

SUFFIXES = CHECKPOINT_SUFFIXES + (".yaml", ".json")  # a save's model, its yaml and the LoRA's card


def owned_saves(cfg) -> Dict[int, List[Path]]:
    """Step -> the files of that save this run wrote, in the LoRA and checkpoint folders."""
    record = read_record(cfg)
    saves: Dict[int, List[Path]] = {}
    for folder in dict.fromkeys([cfg.lora_path(), cfg.checkpoint_path()]):
        for step, suffix, path in saved_names(cfg, folder):
            if suffix in SUFFIXES and path.is_file() and owned(cfg, path, record):
                saves.setdefault(step, []).append(path)
    return saves


def prune_saves(cfg) -> List[Path]:
    """Delete the run's own saves older than the newest keep_last_models (0 keeps all); the deleted files."""
    if cfg.keep_last_models <= 0:
        return []
    saves = owned_saves(cfg)
    removed = []
    for step in sorted(saves)[:-cfg.keep_last_models]:
        for path in saves[step]:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass  # in use or read-only: kept, and tried again at the next save
    return removed
