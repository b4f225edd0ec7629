"""The optimizers a run may choose, each declared once: name, label, what it needs to run, its memory.

Importing this module imports nothing heavy, so the config can offer its names. `optim.py` attaches
one builder to each name and checks the needs declared here, for the form, the checks before a run
and the run itself alike; `memory.py` reads the optimizer state's size. A new optimizer is one entry
here and one `@builds(name)` function there (a test fails when either is missing).
"""

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class OptimizerKind:
    name: str  # the setting's value
    label: str  # for messages and forms
    state_bytes: float  # optimizer state per trained parameter, in bytes (the memory estimate)
    package: str = ""  # a module that must import for it to run ("" = none beyond torch and transformers)
    needs_cuda: bool = False  # runs on an NVIDIA GPU only (bitsandbytes' 8-bit optimizers)
    remedy: str = "choose adamw or adafactor"  # how the sentence refusing it here ends


KINDS: Tuple[OptimizerKind, ...] = (
    OptimizerKind("adamw", "AdamW", state_bytes=8.0),
    OptimizerKind("adamw8bit", "8-bit AdamW", state_bytes=2.0, package="bitsandbytes", needs_cuda=True),
    OptimizerKind("lion8bit", "8-bit Lion", state_bytes=1.0, package="bitsandbytes", needs_cuda=True),
    OptimizerKind("adafactor", "Adafactor", state_bytes=0.1),  # memory.py counts it from the shapes
    OptimizerKind("prodigy", "Prodigy", state_bytes=16.0, package="prodigyopt",
                  remedy="run `pip install prodigyopt` in the WebUI's Python environment or choose adamw"),
)
OPTIMIZERS: Dict[str, OptimizerKind] = {kind.name: kind for kind in KINDS}
NAMES: Tuple[str, ...] = tuple(OPTIMIZERS)
