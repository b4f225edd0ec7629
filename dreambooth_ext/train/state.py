"""Resumable training state: trained weights, optimizer, schedule, EMA, step and loss history.

Written as one folder under a temporary name and renamed, so a kill mid-save leaves the
previous state intact. Random draws are functions of (seed, step), so nothing else is needed
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
    "max_steps", "sample_every", "sample_prompts", "sample_negative_prompt", "sample_seeds", "num_sample_images",
    "sample_steps", "sample_guidance", "save_model_every", "save_state_every", "save_format", "save_dtype",
    "save_lora_merged", "dataloader_workers", "models_dir", "checkpoint_dir", "lora_dir",
}


@dataclass
class Progress:
    step: int = 0
    losses: List[List[float]] = field(default_factory=list)  # [step, loss]
    config: Dict = field(default_factory=dict)


def state_dir(workspace: Path) -> Path:
    return Path(workspace) / "state"


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
    path = state_dir(workspace) / "progress.json"
    if not path.is_file():
        return None
    return Progress(**json.loads(path.read_text()))


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
