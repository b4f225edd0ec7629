"""A Reporter that keeps everything a training run tells it, for tests to read back afterwards."""

import time
from typing import List, Optional

from dreambooth_ext.train.reporter import Reporter


class RecordingReporter(Reporter):
    """Keeps everything it is told; `stop_at_step` asks the run to stop (and save its state) after that step."""

    def __init__(self, stop_at_step: Optional[int] = None):
        self.stages: List[str] = []
        self.losses: List[tuple] = []
        self.samples: List[str] = []
        self.outputs: List[tuple] = []
        self.warnings: List[str] = []
        self.stop_at_step = stop_at_step
        self.started = time.time()

    def stage(self, text, done=None, total=None):
        self.stages.append(text if total is None else f"{text} {done}/{total}")

    def progress(self, step, total, loss, lr):
        self.losses.append((step, loss, lr))

    def sample(self, path, prompt, seed, step):
        self.samples.append(path)

    def output(self, path, kind):
        self.outputs.append((kind, path))

    def warn(self, text):
        self.warnings.append(text)

    def should_stop(self):
        return self.stop_at_step is not None and bool(self.losses) and self.losses[-1][0] >= self.stop_at_step
