"""The name-clash rule: a run replaces only files it wrote itself.

Every model, LoRA and yaml a run writes is recorded in its workspace (path, size, mtime). A file
that would be written at a planned step and already exists is refused at the start unless the
record says this run wrote it (a resumed or repeated run replacing its own output). The same
check runs again just before each write, for files that appeared while the run trained.
"""

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from dreambooth_ext.atomic import write_text
from dreambooth_ext.bridge import checkpoint_suffix
from dreambooth_ext.errors import UserError

RECORD = "written.json"


def writes_lora(cfg) -> bool:
    return cfg.train_mode == "lora"


def writes_checkpoint(cfg) -> bool:
    # a fully trained text encoder does not fit in a LoRA file: it needs the checkpoint too
    return cfg.train_mode != "lora" or cfg.save_lora_merged or cfg.text_encoder_mode == "full"


def is_planned_step(cfg, step: int) -> bool:
    if step == cfg.max_steps:
        return True
    return bool(cfg.save_model_every) and 0 < step < cfg.max_steps and step % cfg.save_model_every == 0


def _targets(cfg):
    """(folder, suffixes) the run writes NAME_<step>.<suffix> into."""
    out = []
    if writes_lora(cfg):
        out.append((cfg.lora_path(), (".safetensors",)))
    if writes_checkpoint(cfg):
        out.append((cfg.checkpoint_path(), (checkpoint_suffix(cfg.save_format), ".yaml")))
    return out


def saved_names(cfg, folder) -> Iterator[Tuple[int, str, Path]]:
    """(step, suffix, path) of every NAME_<step>.<suffix> in `folder`, by name; none when it is not there."""
    pattern = re.compile(re.escape(cfg.name) + r"_(\d+)(\.[A-Za-z]+)$")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            yield int(match.group(1)), match.group(2), Path(folder) / name


def _record_path(cfg) -> Path:
    return cfg.workspace_path() / RECORD


def _identity(path: Path) -> Optional[dict]:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _key(path: Path) -> str:
    return os.path.realpath(str(path))


def read_record(cfg) -> Dict[str, dict]:
    try:
        data = json.loads(_record_path(cfg).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def owned(cfg, path: Path, record: Optional[Dict[str, dict]] = None) -> bool:
    """Did this run write the file now at `path` (and nobody changed it since)?"""
    record = read_record(cfg) if record is None else record
    return record.get(_key(path)) == _identity(Path(path))


def record_written(cfg, path: Path) -> None:
    """Remember a file this run just wrote, so a resumed run may replace it."""
    ident = _identity(Path(path))
    if ident is None:
        return
    record = read_record(cfg)
    record[_key(path)] = ident
    try:
        write_text(_record_path(cfg), json.dumps(record, indent=1))
    except UserError:
        pass  # the file itself is written; only a later replacement is refused


def clash_message(cfg, path: Path) -> str:
    return (f"{path} already exists and was not written by this run of '{cfg.name}'; a run never replaces "
            "another file: give the run another name, or move that file away (a run resumed under the same "
            "name may replace only the files it wrote itself).")


def guard(cfg, path: Path) -> None:
    """Refuse to write `path` when something this run did not write is there."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not owned(cfg, path):
        raise UserError(clash_message(cfg, path))


def clashes(cfg) -> List[Path]:
    """Existing files that the run's planned saves would replace, and that it did not write."""
    record = read_record(cfg)
    base = Path(cfg.checkpoint).expanduser()
    base = _key(base) if str(cfg.checkpoint).strip() else None
    found = []
    for folder, suffixes in _targets(cfg):
        for step, suffix, path in saved_names(cfg, folder):
            if suffix in suffixes and is_planned_step(cfg, step) and (_key(path) == base or not owned(cfg, path, record)):
                found.append(path)
    return found


def check_no_clash(cfg) -> None:
    found = clashes(cfg)
    if found:
        if _key(found[0]) == _key(Path(cfg.checkpoint).expanduser()):
            raise UserError(f"The run would save over its own base model {found[0]}; give the run another name "
                            "(files are written as NAME_<step>).")
        raise UserError(clash_message(cfg, found[0]))
