"""Resumable training state: trained weights, optimizer, schedule, EMA, step and loss history.

Written as one folder under a temporary name; the previous folder is renamed aside, the new
one renamed in, and only then the old one deleted, so one complete state is on disk at every
moment (a kill between the renames leaves the aside, which the next start puts back). Random draws are functions of (seed, step), so nothing else is needed
for a resumed run to end where an uninterrupted one would.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from dreambooth_ext.atomic import atomic_path
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import RETIRED, Concept, TrainConfig, declared

# settings that may change between an interrupted run and its resumption: declared with resumable=True
from dreambooth_ext.train.config_io import to_dict
RESUMABLE_CHANGES = frozenset(declared("resumable", TrainConfig))
CONCEPT_RESUMABLE_CHANGES = frozenset(declared("resumable", Concept))


@dataclass
class Progress:
    step: int = 0
    losses: List[List[float]] = field(default_factory=list)  # [step, loss]
    config: Dict = field(default_factory=dict)
    max_steps: int = 0  # the run's length when saved (0: a state saved before it was kept)


def state_dir(workspace: Path) -> Path:
    return Path(workspace) / "state"


def resumable_config(cfg) -> Dict:
    """The settings a resumed run must share with the saved one: all but those declared resumable."""
    free = set(declared("resumable", type(cfg)))
    data = {k: v for k, v in to_dict(cfg).items() if k not in free}
    data["concepts"] = [{k: v for k, v in c.items() if k not in CONCEPT_RESUMABLE_CHANGES} for c in data["concepts"]]
    return data


def readable_state_dir(workspace: Path) -> Optional[Path]:
    """The state folder, or the aside a killed save left in its place (put back at the next start)."""
    folder = state_dir(workspace)
    if folder.exists():
        return folder
    from dreambooth_ext.bridge.temporaries import left_aside

    return left_aside(folder)


def _unreadable(folder: Path, why: str) -> UserError:
    return UserError(f"The saved training state in {folder} cannot be used ({why}), so this run cannot resume; "
                     "delete that folder to train from step 0, or give the run another name.")


def save_state(workspace: Path, trained: Dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
               ema, progress: Progress):
    from safetensors.torch import save_file

    with atomic_path(state_dir(workspace)) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in trained.items()}, str(tmp / "trained.safetensors"))
        torch.save({
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
        }, str(tmp / "optimizer.pt"))
        (tmp / "progress.json").write_text(json.dumps(progress.__dict__, indent=1))


def read_progress(workspace: Path) -> Optional[Progress]:
    """The saved step, losses and settings; None without a state; UserError for a damaged one."""
    folder = readable_state_dir(workspace)
    if folder is None:
        return None
    path = folder / "progress.json"
    if not path.is_file():
        raise _unreadable(folder, "progress.json is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise _unreadable(folder, f"progress.json is damaged: {type(e).__name__}") from None
    if not (isinstance(data, dict) and isinstance(data.get("step"), int) and data["step"] >= 0
            and isinstance(data.get("losses", []), list) and isinstance(data.get("config", {}), dict)):
        raise _unreadable(folder, "progress.json does not hold a step, losses and settings")
    length = data.get("max_steps", 0)
    return Progress(step=data["step"], losses=data.get("losses", []), config=data.get("config", {}),
                    max_steps=length if isinstance(length, int) and length > 0 else 0)


def check_resumable(saved: Dict, current: Dict) -> List[str]:
    """Settings that differ from the saved run in a way that would change its result."""
    ignored = RESUMABLE_CHANGES | RETIRED  # a state saved before a setting was retired may still hold it
    return sorted(k for k in set(saved) | set(current) if k not in ignored and saved.get(k) != current.get(k))



def check_same_settings(cfg, saved: Progress, workspace: Path) -> None:
    """UserError when the saved run at saved.step used settings that may not change on resume."""
    changed = check_resumable(saved.config, resumable_config(cfg))
    if changed:
        raise UserError(f"A saved run of '{cfg.name}' at step {saved.step} used other settings "
                        f"({', '.join(changed[:4])}); give the new run another name, or delete "
                        f"{state_dir(workspace)} to start afresh.")

def load_state(workspace: Path):
    """(trained tensors, optimizer/scheduler/scaler/ema states) of the saved run."""
    from safetensors.torch import load_file

    folder = state_dir(workspace)
    try:
        trained = load_file(str(folder / "trained.safetensors"))
        rest = torch.load(str(folder / "optimizer.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"The saved training state in {folder} cannot be read ({str(e).splitlines()[0][:120]}); "
                        "delete that folder to start this model afresh.") from None
    return trained, rest
