"""Key tables between the WebUI's single-file layout and diffusers, and the walks over them.

A table is a list of rows. Each row names the diffusers key(s) of one tensor, the
single-file key it comes from, and the operation between the two layouts. The same
table is walked in both directions, so a round trip can be checked row by row.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

# Operations. Each has a forward (single file -> diffusers) and an inverse.
COPY = "copy"
CONV_TO_LINEAR = "conv1x1->linear"  # VAE attention: [C, C, 1, 1] <-> [C, C]
TRANSPOSE = "transpose"  # OpenCLIP text_projection is applied as x @ P, a Linear holds P.T
SPLIT3 = "split3"  # OpenCLIP fused in_proj -> q, k, v


@dataclass(frozen=True)
class Row:
    single: str
    diffusers: Tuple[str, ...]
    op: str = COPY
    optional: bool = False  # may be absent on either side (e.g. position_ids)


def forward(op: str, tensor: torch.Tensor) -> List[torch.Tensor]:
    """Single-file tensor -> the diffusers tensor(s) of a row."""
    if op == COPY:
        return [tensor]
    if op == CONV_TO_LINEAR:
        return [tensor.reshape(tensor.shape[0], tensor.shape[1])] if tensor.dim() == 4 else [tensor]
    if op == TRANSPOSE:
        return [tensor.t().contiguous()]
    if op == SPLIT3:
        return [t.contiguous() for t in tensor.chunk(3, dim=0)]
    raise ValueError(f"unknown key-map operation {op!r}")


def inverse(op: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The diffusers tensor(s) of a row -> the single-file tensor."""
    if op == COPY:
        return tensors[0]
    if op == CONV_TO_LINEAR:
        t = tensors[0]
        return t.reshape(t.shape[0], t.shape[1], 1, 1) if t.dim() == 2 else t
    if op == TRANSPOSE:
        return tensors[0].t().contiguous()
    if op == SPLIT3:
        return torch.cat(list(tensors), dim=0)
    raise ValueError(f"unknown key-map operation {op!r}")


def forward_shapes(op: str, shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    """Shapes the forward op yields, without touching data (for checks before any work)."""
    if op == COPY:
        return [tuple(shape)]
    if op == CONV_TO_LINEAR:
        return [tuple(shape[:2])] if len(shape) == 4 else [tuple(shape)]
    if op == TRANSPOSE:
        return [tuple(reversed(shape))]
    if op == SPLIT3:
        return [(shape[0] // 3,) + tuple(shape[1:])] * 3
    raise ValueError(f"unknown key-map operation {op!r}")


def prefixed(rows: Sequence[Row], single_prefix: str, diffusers_prefix: str) -> List[Row]:
    """The same rows with both sides moved under a component's prefix."""
    return [
        Row(single_prefix + r.single, tuple(diffusers_prefix + d for d in r.diffusers), r.op, r.optional)
        for r in rows
    ]


def rows_from_module_map(
    diffusers_keys: Sequence[str],
    module_map: Dict[str, str],
    rename: Callable[[str, str], Tuple[str, str]],
) -> List[Row]:
    """Build key rows from a module-prefix map.

    `module_map` maps a diffusers module path to the single-file module path; each
    diffusers key is matched to its longest mapped prefix, and `rename(prefix, rest)`
    turns the remainder into (single-file remainder, op). A key no prefix matches is a
    bug in the map, so it raises rather than silently losing a weight.
    """
    rows = []
    for key in diffusers_keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in module_map:
                rest, op = rename(prefix, ".".join(parts[cut:]))
                rows.append(Row(module_map[prefix] + "." + rest, (key,), op))
                break
        else:
            raise KeyError(f"no single-file mapping for diffusers key {key}")
    return rows


def inverse_shape(op: str, shapes: Sequence[Tuple[int, ...]]) -> Tuple[int, ...]:
    """Shape the inverse op yields from the diffusers shapes of a row."""
    if op == COPY:
        return tuple(shapes[0])
    if op == CONV_TO_LINEAR:
        return tuple(shapes[0]) + (1, 1) if len(shapes[0]) == 2 else tuple(shapes[0])
    if op == TRANSPOSE:
        return tuple(reversed(shapes[0]))
    if op == SPLIT3:
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    raise ValueError(f"unknown key-map operation {op!r}")
