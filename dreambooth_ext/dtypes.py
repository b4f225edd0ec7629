"""The package's one table of dtype names: fp16, bf16 and fp32 (settings, files, messages).

accelerate spells "no mixed precision" as "no"; `compute_dtype` reads that spelling too.
"""

from typing import Dict

import torch

DTYPES: Dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NO_MIXED_PRECISION = "no"  # accelerate's mixed_precision when the maths runs in fp32


def dtype_name(dtype: torch.dtype) -> str:
    """fp16, bf16 or fp32 for a dtype of the table; the torch name for any other."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")


def compute_dtype(mode: str) -> torch.dtype:
    """The dtype of the maths under accelerate's mixed_precision `mode` ("no", "fp16" or "bf16")."""
    return torch.float32 if mode == NO_MIXED_PRECISION else DTYPES[mode]


def describe_precision(mode: str) -> str:
    """How a message names accelerate's mixed_precision `mode`: fp32, or e.g. bf16 mixed precision."""
    return "fp32" if mode == NO_MIXED_PRECISION else f"{mode} mixed precision"
