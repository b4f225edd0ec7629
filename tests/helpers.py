"""Small test utilities shared by the bridge tests."""

import shutil
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file


def load_any(path: Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".ckpt":
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        return obj.get("state_dict", obj)
    return load_file(str(path))


def assert_same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]):
    """Same keys, dtypes, shapes and bits."""
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def copy_with_yaml(src: Path, dst: Path) -> Path:
    """Copy a checkpoint and its beside-yaml (and CLIP folder reference stays absolute)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    if src.with_suffix(".yaml").is_file():
        shutil.copy2(src.with_suffix(".yaml"), dst.with_suffix(".yaml"))
    return dst


def write_variant(src: Path, dst: Path, state: Dict[str, torch.Tensor]) -> Path:
    """Save `state` at dst (format by suffix) with src's beside-yaml copied next to it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 1234}, str(dst))
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    if src.with_suffix(".yaml").is_file():
        shutil.copy2(src.with_suffix(".yaml"), dst.with_suffix(".yaml"))
    return dst
