"""Turn a component's key table into a write plan, in either direction, checking every shape first.

Nothing is read beyond headers while planning: each Entry reads and transforms its
tensor only when the writer asks for it.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Set

import torch

from dreambooth_ext.bridge.components import Component
from dreambooth_ext.bridge.keymap import forward, forward_shapes, inverse, inverse_shape
from dreambooth_ext.bridge.keymap_text import DERIVED_BUFFERS
from dreambooth_ext.bridge.tensor_io import Entry, TensorSource


@dataclass
class Plan:
    entries: List[Entry] = field(default_factory=list)
    consumed: Set[str] = field(default_factory=set)  # source keys the plan uses
    problems: List[str] = field(default_factory=list)  # shape mismatches and missing weights


def cast_to(dtype: Optional[torch.dtype], source_dtype: torch.dtype) -> torch.dtype:
    """The output dtype: the requested one for float tensors, the source's otherwise."""
    return dtype if (dtype is not None and source_dtype.is_floating_point) else source_dtype


class _OneTensorCache:
    """Split rows read one source tensor three times in a row; keep just the last one."""

    def __init__(self, source: TensorSource):
        self.source, self.key, self.value = source, None, None

    def get(self, key: str) -> torch.Tensor:
        if key != self.key:
            self.key, self.value = key, None
            self.value = self.source.get(key)
        return self.value


def plan_to_diffusers(comp: Component, source: TensorSource, dtype: Optional[torch.dtype]) -> Plan:
    plan = Plan()
    cache = _OneTensorCache(source)
    for row in comp.rows:
        if row.single not in source:
            if not row.optional:
                plan.problems.append(f"missing {row.single}")
            continue
        plan.consumed.add(row.single)
        got = forward_shapes(row.op, source.shape(row.single))
        src_dtype = source.dtype(row.single)
        for i, (dkey, shape) in enumerate(zip(row.diffusers, got)):
            # a buffer this transformers version no longer keeps (position_ids under 4.46) is still
            # written: the folder stays faithful to the file, and loading ignores it
            want = comp.shapes.get(dkey, shape if row.optional else None)
            if want != shape:
                plan.problems.append(f"{row.single}: shape {list(shape)} but the config expects {list(want or [])}")
                continue
            out = cast_to(dtype, src_dtype)

            def produce(key=row.single, op=row.op, i=i, out=out):
                return forward(op, cache.get(key))[i].to(out)

            plan.entries.append(Entry(dkey, shape, out, produce))
    return plan


def plan_to_single(comp: Component, source: TensorSource, dtype: Optional[torch.dtype]) -> Plan:
    """`source` holds one diffusers component's keys (no prefix)."""
    plan = Plan()
    for row in comp.rows:
        present = [k in source for k in row.diffusers]
        if not all(present):
            if not row.optional:
                missing = [k for k, p in zip(row.diffusers, present) if not p]
                plan.problems.append(f"{comp.name} lacks {', '.join(missing)}")
            continue
        plan.consumed.update(row.diffusers)
        shapes = [source.shape(k) for k in row.diffusers]
        want = [comp.shapes.get(k) for k in row.diffusers]
        if any(w is not None and w != s for w, s in zip(want, shapes)):
            plan.problems.append(f"{comp.name}/{row.diffusers[0]}: shape {list(shapes[0])}, config expects {list(want[0])}")
            continue
        out = cast_to(dtype, source.dtype(row.diffusers[0]))

        def produce(keys=row.diffusers, op=row.op, out=out):
            return inverse(op, [source.get(k) for k in keys]).to(out)

        plan.entries.append(Entry(row.single, inverse_shape(row.op, shapes), out, produce))
    leftover = [k for k in source.keys() if k not in plan.consumed and k not in DERIVED_BUFFERS]
    if leftover:
        plan.problems.append(f"{comp.name} has weights the single-file layout has no place for: {', '.join(sorted(leftover)[:5])}")
    return plan


def shapes_summary(problems: List[str], limit: int = 4) -> str:
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more

