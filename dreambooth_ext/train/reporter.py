"""How a run talks to whoever drives it: the CLI's progress bar, the tab's job, a test."""

import logging
from typing import Optional

from dreambooth_ext.errors import Cancelled  # noqa: F401 - re-exported: the trainer raises it

log = logging.getLogger("dreambooth_ext.train")


class Reporter:
    """The calls a training run makes. Subclasses override what they show; the defaults log."""

    def stage(self, text: str, done: Optional[int] = None, total: Optional[int] = None) -> None:
        """A phase before or around the training steps (converting, class images, caching)."""
        log.info(text if total is None else f"{text} {done}/{total}")

    def start(self, first_step: int, total: int, history=()) -> None:
        """The training steps begin (at first_step when resuming, with the saved [step, loss] history)."""

    def progress(self, step: int, total: int, loss: float, lr: float) -> None:
        """One optimizer step is done."""

    def sample(self, path: str, prompt: str, seed: int, step: int) -> None:
        log.info(f"sample at step {step}: {path}")

    def output(self, path: str, kind: str) -> None:
        """A file the run wrote for the WebUI (kind: checkpoint, lora, yaml)."""
        log.info(f"wrote {path}")

    def warn(self, text: str) -> None:
        log.warning(text)

    def should_stop(self) -> bool:
        """Asked between steps; True ends the run after saving its state."""
        return False


class ConsoleReporter(Reporter):
    """tqdm bar with loss, learning rate and ETA on the terminal."""

    def __init__(self):
        self._bar = None
        self.stop_requested = False

    def start(self, first_step: int, total: int, history=()) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=first_step, desc="training", unit="step", dynamic_ncols=True)

    def progress(self, step: int, total: int, loss: float, lr: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def stage(self, text: str, done: Optional[int] = None, total: Optional[int] = None) -> None:
        if total is None or done in (0, total) or (total and done % max(1, total // 10) == 0):
            super().stage(text, done, total)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text)

    def sample(self, path: str, prompt: str, seed: int, step: int) -> None:
        self._write(f"sample (step {step}, seed {seed}): {path}")

    def output(self, path: str, kind: str) -> None:
        self._write(f"wrote {kind}: {path}")

    def warn(self, text: str) -> None:
        self._write(f"warning: {text}")

    def should_stop(self) -> bool:
        return self.stop_requested

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
