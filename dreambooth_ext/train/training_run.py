"""One training run's state in one object, and what it does besides the steps: samples, the
monitor, training state, model files, resume.

train/run.py fills a TrainingRun phase by phase (prepare -> data -> place -> loop -> finish);
everything here reads its inputs from the run rather than from a row of positional arguments.
"""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

from dreambooth_ext.errors import UserError
from dreambooth_ext.train import state as st
from dreambooth_ext.train.conditioning import TextOptions
from dreambooth_ext.train.config import TrainConfig
from dreambooth_ext.train.finite import NonFiniteWeights, check_finite_weights
from dreambooth_ext.train.monitor import Monitor, MonitorLine, closing_note, describe
from dreambooth_ext.train.output import write_outputs
from dreambooth_ext.train.placement import Placement
from dreambooth_ext.train.reporter import Reporter
from dreambooth_ext.train.retention import prune_saves
from dreambooth_ext.train.samples import generate_samples, sample_prompts, sample_seeds


@dataclass
class TrainResult:
    status: str  # finished | cancelled
    step: int
    outputs: List[str] = field(default_factory=list)
    losses: List[List[float]] = field(default_factory=list)
    samples: List[str] = field(default_factory=list)
    best_step: Optional[int] = None  # the monitor's pick (see train/monitor.py); None when it did not run


@dataclass
class TrainingRun:
    """Settings, machine, models and optimizer of one run; the phases fill the later fields."""

    cfg: TrainConfig
    reporter: Reporter
    acc: Any  # accelerate.Accelerator
    placement: Placement
    workspace: Path
    bundle: Any = None  # models.ModelBundle
    # data
    instances: Any = None  # dataset.ExampleSet
    classes: Any = None
    latents: Any = None  # dataset.LatentSource
    # what trains, and how
    trainables: Any = None  # trainables.Trainables
    attention: str = ""
    unet: Any = None  # the UNet as accelerate prepared it (data-parallel under `accelerate launch`)
    text_encoders: List[Any] = field(default_factory=list)
    prompts: Any = None  # batches.PromptCache
    micro: Any = None  # batches.MicroBatch
    synced: List[Any] = field(default_factory=list)  # modules whose gradients are averaged across processes
    optimizer: Any = None
    fused: Any = None  # fused_backward.FusedBackward when the optimizer steps inside the backward pass
    lr_scheduler: Any = None
    ema: Any = None
    monitor: Optional[Monitor] = None
    progress: Optional[st.Progress] = None
    result: Optional[TrainResult] = None
    first_step: int = 0  # where this session's steps began (a resumed run starts past 0)
    started: float = 0.0  # time.time() at the first step

    @property
    def device(self):
        return self.acc.device

    @property
    def step(self) -> int:
        return self.progress.step

    def text_options(self) -> TextOptions:
        return TextOptions.from_config(self.cfg, self.bundle.family)

    # --- samples and the monitor -------------------------------------------------------------

    @contextlib.contextmanager
    def sampling(self):
        """Models on the device for sampling, EMA weights swapped in; back to training afterwards."""
        self.placement.enter(self.bundle, "sample")
        try:
            with self.ema_weights():
                yield
        finally:
            self.placement.enter(self.bundle, "train")

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights in while saving or sampling, then put the trained ones back."""
        if self.ema is None:
            yield
            return
        params = self.trainables.parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def samples(self) -> List[str]:
        """The sample images at this step; one that cannot be written (a full disk) is a warning."""
        cfg, step = self.cfg, self.step
        self.reporter.stage(f"samples at step {step}")
        try:
            with self.sampling():
                paths = generate_samples(
                    self.bundle, self.trainables.unet, self.trainables.text_encoders, sample_prompts(cfg),
                    sample_seeds(cfg, cfg.num_sample_images), steps=cfg.sample_steps, guidance=cfg.sample_guidance,
                    negative_prompt=cfg.sample_negative_prompt, resolution=cfg.resolution,
                    out_dir=self.workspace / "samples", step=step,
                    on_image=lambda path, prompt, seed: self.reporter.sample(str(path), prompt, seed, step),
                    autocast=self.placement.autocast, text=self.text_options())
        except UserError as e:
            self.reporter.warn(str(e))
            return []
        return [str(p) for p in paths]

    def start_monitor(self) -> None:
        """The fidelity / class-drift monitor, while samples are on (it measures at the sample steps)."""
        cfg = self.cfg
        if not self.acc.is_main_process or not cfg.sample_every or not cfg.concepts:
            return
        self.reporter.stage("monitor: the base model's pictures for the instance and class prompts")
        self.placement.enter(self.bundle, "sample")
        try:
            self.monitor = Monitor(cfg, self.bundle, self.trainables.unet, self.trainables.text_encoders,
                                   self.workspace, autocast=self.placement.autocast)
        finally:
            self.placement.enter(self.bundle, "train")
        kept = self.monitor.record
        if kept.points:  # a resumed run: the figures monitor.json kept for this run, for the tab's plot
            self.reporter.stage(MonitorLine.of(f"monitor: {len(kept.points)} measurements from before the resume "
                                               f"(up to step {kept.points[-1].step})", record=kept))

    def measure(self, last: bool = False) -> Optional[int]:
        """The monitor's figures at this step; at the end, its closing note and the step it picks."""
        if self.monitor is None:
            return None
        with self.sampling():
            self.reporter.stage(describe(self.monitor.measure(self.step)))
        if last:
            self.reporter.stage(closing_note(self.monitor.record))
        return self.monitor.record.best_step()

    # --- training state ----------------------------------------------------------------------

    def save_state(self) -> None:
        check_finite_weights(self.cfg, self.trainables, self.step)
        self.progress.config = st.resumable_config(self.cfg)
        self.progress.max_steps = self.cfg.max_steps
        st.save_state(self.workspace, self.trainables.state(), self.optimizer, self.lr_scheduler, self.acc.scaler,
                      self.ema, self.progress)

    def try_save_state(self) -> Optional[str]:
        """Save the state; a failure (a full disk) is returned, so the model can still be written."""
        try:
            self.save_state()
        except NonFiniteWeights:
            raise
        except UserError as e:
            return str(e)
        return None

    def resume(self) -> st.Progress:
        """The saved progress of this run, its weights, optimizer and schedule loaded; or a fresh start."""
        cfg = self.cfg
        saved = st.read_progress(self.workspace)
        if saved is None or saved.step == 0:
            return st.Progress(config=st.resumable_config(cfg))
        st.check_same_settings(cfg, saved, self.workspace)  # as precheck did; the state may be newer
        trained, rest = st.load_state(self.workspace)
        self.trainables.load(trained)
        self.optimizer.load_state_dict(rest["optimizer"])
        self.lr_scheduler.load_state_dict(rest["lr_scheduler"])
        if self.acc.scaler is not None and rest.get("scaler"):
            self.acc.scaler.load_state_dict(rest["scaler"])
        if self.ema is not None and rest.get("ema"):
            self.ema.load_state_dict(rest["ema"])
        self.reporter.stage(f"resuming '{cfg.name}' from step {saved.step}")
        if saved.max_steps and saved.max_steps != cfg.max_steps and not cfg.lr_scheduler.startswith("constant"):
            self.reporter.warn(f"This run was saved as {saved.max_steps} steps long and now runs to {cfg.max_steps}: "
                               f"its '{cfg.lr_scheduler}' learning-rate schedule now spans {cfg.max_steps} steps, so "
                               f"from step {saved.step + 1} on its rates differ from those of either length run "
                               "straight through.")
        return saved

    # --- model files -------------------------------------------------------------------------

    def write_model(self) -> List[str]:
        """The model files at this step (EMA weights when kept), then the kept-N rule."""
        step = self.step
        self.reporter.stage(f"saving the model at step {step}")
        with self.ema_weights():
            check_finite_weights(self.cfg, self.trainables, step)
            written = write_outputs(self.cfg, self.bundle, self.trainables, step, self.reporter)
        removed = prune_saves(self.cfg)
        if removed:
            self.reporter.stage(f"removed {len(removed)} older files of this run "
                                f"(keep_last_models {self.cfg.keep_last_models})")
        return [str(p) for p in written]

    def _write_model_or(self, failed: Callable[[UserError], List[str]]) -> List[str]:
        """write_model; `failed` says what a model that cannot be written (a full disk) means here.
        Non-finite weights are never caught: nothing is written from them."""
        try:
            return self.write_model()
        except NonFiniteWeights:
            raise
        except UserError as e:
            return failed(e)

    def model_during_run(self) -> List[str]:
        """A save_model_every save; when it fails, the state is saved so the training so far is kept."""
        def failed(e):
            raise self._model_lost(e, self.try_save_state(), "saved", "to go on from there") from None

        return self._write_model_or(failed)

    def model_on_interrupt(self) -> List[str]:
        """save_model_on_interrupt: the model as it is when stopped; a failure is a warning (the state is saved)."""
        def failed(e):
            self.reporter.warn(f"The model at step {self.step} was not written: {e}")
            return []

        return self._write_model_or(failed)

    def final_model(self, state_error: Optional[str], save_state_if_lost: bool) -> List[str]:
        """The last model files; a failure says what is kept, so nothing trained is lost without a word.

        save_state_if_lost: the state was not saved at the end, so save it when the model cannot be written.
        """
        def failed(e):
            lost = self.try_save_state() if save_state_if_lost else state_error
            raise self._model_lost(e, lost, "kept", "to write the model without training again") from None

        written = self._write_model_or(failed)
        if state_error:
            self.reporter.warn(f"The model was written, but the training state was not: {state_error}")
        return written

    def _model_lost(self, error: UserError, state_error: Optional[str], kept: str, purpose: str) -> UserError:
        if state_error:
            return UserError(f"{error} The training state could not be saved either: {state_error}")
        return UserError(f"{error} The training state at step {self.step} is {kept} in "
                         f"{st.state_dir(self.workspace)}: run the same settings again {purpose}.")
