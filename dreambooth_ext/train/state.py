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

from dreambooth_ext.bridge.tensor_io import atomic_path
from dreambooth_ext.errors import UserError

# settings that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {
    "max_steps", "max_epochs", "sample_every", "sample_prompts", "sample_negative_prompt", "sample_seeds", "num_sample_images",
    "sample_steps", "sample_guidance", "save_model_every", "save_state_every", "save_format", "save_dtype",
    "monitor_clip_model",
    "save_lora_merged", "keep_last_models",
    "save_model_on_interrupt", "dataloader_workers", "models_dir", "checkpoint_dir", "lora_dir",
    # memory and speed only: the same steps compute the same result
    "gradient_checkpointing", "attention", "cache_text_embeddings",
}
CONCEPT_RESUMABLE_CHANGES = {"concept_sample_prompts"}


@dataclass
class Progress:
    step: int = 0
    losses: List[List[float]] = field(default_factory=list)  # [step, loss]
    config: Dict = field(default_factory=dict)


def state_dir(workspace: Path) -> Path:
    return Path(workspace) / "state"


def resumable_config(cfg) -> Dict:
    """The settings a resumed run must share with the saved one."""
    from dreambooth_ext.train.config import to_dict

    data = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
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
    return Progress(step=data["step"], losses=data.get("losses", []), config=data.get("config", {}))


def check_resumable(saved: Dict, current: Dict) -> List[str]:
    """Settings that differ from the saved run in a way that would change its result."""
    return sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))


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
