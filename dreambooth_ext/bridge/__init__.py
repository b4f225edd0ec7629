"""Checkpoint bridge: WebUI single-file checkpoints <-> diffusers folders, both directions, offline.

Names are imported on first use, so importing a key table does not load diffusers.
"""

import importlib
import os
from typing import Union

# the single-file checkpoint formats, as the WebUI lists them (any case: .SAFETENSORS too)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

_EXPORTS = {
    "Detection": "detect",
    "detect_family": "detect",
    "ConvertReport": "to_diffusers",
    "single_file_to_diffusers": "to_diffusers",
    "WriteReport": "to_single",
    "diffusers_to_single_file": "to_single",
}

__all__ = sorted(_EXPORTS) + ["CHECKPOINT_SUFFIXES", "is_checkpoint_name", "checkpoint_suffix"]


def is_checkpoint_name(path: Union[str, os.PathLike]) -> bool:
    """Does the name end in a single-file checkpoint suffix (in any case)?"""
    return os.fspath(path).lower().endswith(CHECKPOINT_SUFFIXES)


def checkpoint_suffix(save_format: str) -> str:
    """The file suffix of the save_format setting ('safetensors' or 'ckpt')."""
    return ".ckpt" if save_format == "ckpt" else ".safetensors"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
