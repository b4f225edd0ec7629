"""Checkpoint bridge: WebUI single-file checkpoints <-> diffusers folders, both directions, offline.

Names are imported on first use, so importing a key table does not load diffusers.
"""

import importlib

_EXPORTS = {
    "Detection": "detect",
    "detect_family": "detect",
    "ConvertReport": "to_diffusers",
    "single_file_to_diffusers": "to_diffusers",
    "WriteReport": "to_single",
    "diffusers_to_single_file": "to_single",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
