"""Architecture configs of the real model families, shipped as JSON so no model hub is needed.

Each data/families/<name>.json holds the diffusers UNet and VAE configs, the transformers
CLIPTextConfig of each text encoder (with the pad token of its tokenizer) and the scheduler
config of the published release of that family.
"""

import copy
import functools
import json
from pathlib import Path
from typing import Any, Dict, Tuple

FAMILIES_DIR = Path(__file__).resolve().parent.parent / "data" / "families"
FAMILY_NAMES: Tuple[str, ...] = ("sd1", "sd2", "sd2-v", "sdxl")


@functools.lru_cache(maxsize=None)
def _read(name: str) -> Dict[str, Any]:
    with open(FAMILIES_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def load_family(name: str) -> Dict[str, Any]:
    """The config dict of one family; a fresh copy, so callers may edit it."""
    if name not in FAMILY_NAMES:
        raise ValueError(f"unknown model family {name!r}; valid names: {', '.join(FAMILY_NAMES)}")
    return copy.deepcopy(_read(name))


def new_text_encoder(spec: Dict[str, Any]):
    """A text encoder built (randomly initialised) from one entry of a family's "text_encoders" list."""
    import transformers

    return getattr(transformers, spec["class"])(transformers.CLIPTextConfig(**spec["config"]))
