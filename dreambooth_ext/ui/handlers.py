"""What the tab's buttons do, as plain functions of plain values: testable without a browser or gradio.

Form values travel as the dict described in `form.py`; the checkpoint is shown by its title in
the host's list and stored in the config as a path. Training runs in the job runner's thread,
inside `host.run_exclusive` and reporting to the host's own progress bar.
"""

import importlib.util
import math
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dreambooth_ext.bridge import is_checkpoint_name
from dreambooth_ext.errors import UserError
from dreambooth_ext.hostapi import Host
from dreambooth_ext.folders import apply_host_folders, check_paths, settings_file
from dreambooth_ext.paths import within
from dreambooth_ext.jobs import RUNNER, JobRunner, JobState, check_host, host_hooks, status_text
from dreambooth_ext.train.config import TrainConfig
from dreambooth_ext.train.config_io import load_config, save_config, to_dict
from dreambooth_ext.train.config_checks import validate
from dreambooth_ext.train.recommend import recommended
from dreambooth_ext.train.state import read_progress
from dreambooth_ext.train.epochs import epoch_note, resolve_max_steps
from dreambooth_ext.ui.form import config_to_form, default_form, form_to_dict

GALLERY_ITEMS = 48  # newest samples a poll sends to the page (a run may make thousands)


@dataclass
class Reply:
    """A one-paragraph answer to a button; ok=False shows it as an error."""

    text: str
    ok: bool = True


@dataclass
class View:
    """What a poll shows. `key` changes whenever anything but the status line changed."""

    key: str
    running: bool
    status: str
    losses: List[List[float]] = field(default_factory=list)
    monitor: List[Any] = field(default_factory=list)  # the training monitor's points (train/monitor.py)
    monitor_note: str = ""  # its closing note, once the run has ended
    samples: List[Tuple[str, str]] = field(default_factory=list)  # (path, caption), newest first
    outputs: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    error: str = ""
    finished: bool = False  # ended with a checkpoint to offer as the active one
    written: str = ""  # names the checkpoints an ended job wrote; a change makes the page refresh its own list
    queue: List[str] = field(default_factory=list)  # names of the jobs waiting their turn, first first


class Handlers:
    def __init__(self, host: Host, runner: Optional[JobRunner] = None):
        self.host = host
        self.runner = runner or RUNNER
        self.activated_title = ""

    # --- the checkpoint list
    def checkpoint_titles(self) -> List[str]:
        return [title for title, _ in self.host.list_checkpoints()]

    def checkpoint_path(self, title: str) -> str:
        """A title from the dropdown as a path (also one that has since gained its ' [hash]'); anything else
        is taken as a path typed in."""
        if not title:
            return ""
        return self.host.checkpoint_file(title) or title

    def checkpoint_title(self, path: str) -> str:
        if not path:
            return ""
        for title, p in self.host.list_checkpoints():
            if title == path or _same_file(p, path):
                return title
        return path

    def current_title(self, value: str) -> str:
        """The dropdown's value as a title of the list now: a title that has since gained ' [hash]' gets it."""
        return self.checkpoint_title(self.checkpoint_path(value)) if value else ""

    def refresh(self) -> List[str]:
        """The host's list read again; not while a job runs: the job holds the host's queue lock, which a
        refresh waits for, and the job's end refreshes the list anyway."""
        if not self._running():
            self.host.refresh_checkpoints()
        return self.checkpoint_titles()

    def _running(self) -> bool:
        return self.runner.current is not None and not self.runner.current.done

    def initial_form(self) -> Dict[str, Any]:
        form = default_form()
        form["checkpoint"] = self.checkpoint_title(self.host.active_checkpoint() or "")
        if self.host.clip_skip():  # the WebUI's own Clip skip, so training reads prompts as txt2img will
            form["clip_skip"] = self.host.clip_skip()
        return form

    # --- form <-> config
    def config(self, form: Dict[str, Any], extras: Sequence[Dict[str, Any]] = ()) -> TrainConfig:
        data = form_to_dict(form, extras)
        data["checkpoint"] = self.checkpoint_path(data.get("checkpoint", ""))
        return load_config(apply_host_folders(data, self.host))  # results go where the host looks

    def form_of(self, cfg: TrainConfig) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        form, extras = config_to_form(cfg)
        form["checkpoint"] = self.checkpoint_title(cfg.checkpoint)
        return form, extras

    def default_config_path(self, form: Dict[str, Any]) -> str:
        name = str(form.get("name") or "").strip() or "dreambooth"
        root = self.host.workspace_root() or self.host.models_dir() / "dreambooth"
        return str(Path(root) / name / "config.json")

    def save(self, form: Dict[str, Any], extras: Sequence[Dict[str, Any]], path: str) -> Tuple[Reply, str]:
        """Write the form as a JSON config inside the host's folders; an empty path means the run's workspace."""
        shown = (path or "").strip() or self.default_config_path(form)
        try:
            target = settings_file(shown, self.host.allowed_roots())
            if target.exists() and not _is_settings_file(target):  # never replace a file of something else
                raise UserError(f"{shown} exists and is not a DreamBooth settings file; choose another name.")
            written = save_config(self.config(form, extras), target)
        except UserError as e:
            return Reply(f"Not saved: {e}", ok=False), shown
        except OSError as e:
            return Reply(f"Not saved: {shown} cannot be written ({e.strerror or e}).", ok=False), shown
        return Reply(f"Saved the settings to {written}."), str(written)

    def load(self, path: str) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]], Reply]:
        """The form and extra concepts of a JSON config inside the host's folders, or None and the reason."""
        path = (path or "").strip()
        if not path:
            return None, [], Reply("Enter the path of a JSON config file to load.", ok=False)
        try:
            cfg = load_config(settings_file(path, self.host.allowed_roots()))
        except UserError as e:
            return None, [], Reply(str(e), ok=False)
        form, extras = self.form_of(cfg)
        more = f" {len(extras)} more concepts from the file are kept but not shown." if extras else ""
        return form, extras, Reply(f"Loaded {path}.{more}")

    def recommend(self, form: Dict[str, Any], family: str, mode: str,
                  vram_gb: Optional[float]) -> Tuple[Dict[str, Any], Reply]:
        """The form with recommended() applied; the reply lists what changed."""
        try:
            vram = _memory_gb(vram_gb)
            changes = recommended(family, mode, vram, have_bitsandbytes=_have("bitsandbytes"), have_bf16=_gpu_has_bf16())
        except UserError as e:
            return form, Reply(str(e), ok=False)
        new = dict(form)
        changed = []
        for name, value in changes.items():
            if new.get(name) != value:
                changed.append(f"{name} = {value}")
            new[name] = value
        memory = f"{vram:g} GB" if vram is not None else "unknown GPU memory"
        what = ", ".join(changed) if changed else "nothing needed changing"
        note = " (full training does not fit: switched to LoRA)" if mode == "full" and changes["train_mode"] == "lora" else ""
        return new, Reply(f"Recommended for {family}, {mode} training, {memory}{note}: {what}.")

    # --- training
    def train(self, form: Dict[str, Any], extras: Sequence[Dict[str, Any]] = (), resume: bool = False) -> Reply:
        """Start a job from the form; a job already running gets the runner's message, not a second job.
        Whatever the runner refuses at its start (checks before any work) is the reply, word for word."""
        try:
            cfg = self.config(form, extras)
            if self.host.non_local():  # anyone who can open the page may press Train: the API's folder rule
                check_paths(to_dict(cfg), self.host.allowed_roots(), [p for _t, p in self.host.list_checkpoints()])
            validate(cfg)  # hard errors now; warnings come through the job
            check_host(cfg, self.host)  # e.g. the WebUI's txt2img for class images, only inside the WebUI
            cfg = resolve_max_steps(cfg)  # max_epochs: the step count the run will have
            saved = _saved_progress(cfg)
            on_event, around = host_hooks(self.host, cfg.name, cfg.max_steps)
            job = self.runner.start(cfg, on_event=on_event, around=around)
        except UserError as e:
            return Reply(str(e), ok=False)
        except Exception as e:  # noqa: BLE001 - a bug: one sentence here, the traceback in the console
            traceback.print_exc()
            return Reply(f"Training could not start: {type(e).__name__}: {_first_line(e)}", ok=False)
        if getattr(job, "snapshot", None) and job.snapshot().status == "queued":
            return Reply(self._queued_text(cfg))
        return Reply(_start_text(cfg, saved, resume))

    def _queued_text(self, cfg: TrainConfig) -> str:
        names = [s.name for s in self.runner.waiting()]
        position = names.index(cfg.name) + 1 if cfg.name in names else len(names)
        running = self.runner.current.cfg.name if self.runner.current is not None else "the running job"
        before = f"'{running}' and the jobs before it have" if position > 1 else f"'{running}' has"
        return f"'{cfg.name}' waits in the queue (number {position}); it starts when {before} ended."

    def epoch_note(self, form: Dict[str, Any]) -> str:
        """Steps per epoch for the form's images and batch, or nothing while the form cannot tell."""
        try:
            return epoch_note(self.config(form))
        except Exception:  # noqa: BLE001 - a half-filled form: no line, never a broken tab
            return ""

    def interrupt(self) -> Reply:
        if self.runner.cancel():
            after = " The next job in the queue starts then." if self.runner.waiting() else ""
            return Reply(f"Stopping after this step; the state is saved. Press Resume to go on.{after}")
        return Reply("Nothing is training.", ok=False)

    def remove_queued(self, name: str) -> Reply:
        """Take a waiting job out of the queue before it starts."""
        name = (name or "").strip()
        if not name:
            return Reply("Pick a waiting job to remove from the queue.", ok=False)
        if self.runner.remove(name):
            return Reply(f"Removed '{name}' from the queue; nothing of it had started.")
        current = self.runner.current
        if current is not None and not current.done and current.cfg.name == name:
            return Reply(f"'{name}' is running, not waiting; press Interrupt to stop it.", ok=False)
        return Reply(f"No job named '{name}' waits in the queue.", ok=False)

    def queued_names(self) -> List[str]:
        return [s.name for s in self.runner.waiting()]

    # --- reading the job
    def poll(self) -> View:
        job = self.runner.current
        if job is None:
            return View(key="idle", running=False, status="Idle: fill in a concept and press Train.")
        s = job.snapshot()
        queue = self.queued_names()
        running = s.status in ("starting", "running") or bool(queue)  # the page polls on while jobs wait
        key = (f"{id(job)}:{s.status}:{len(s.losses)}:{len(s.samples)}:{len(s.outputs)}:{len(s.warnings)}:"
               f"{len(s.monitor)}:{bool(s.monitor_note)}:" + "/".join(queue))
        samples = [(p, _sample_caption(p)) for p in reversed(s.samples[-GALLERY_ITEMS:])]
        checkpoints = self._checkpoints(s)
        finished = s.status == "finished" and bool(checkpoints)
        ended = s.status not in ("starting", "running")
        written = f"{id(job)}:{len(checkpoints)}" if checkpoints and ended else ""
        return View(key=key, running=running, status=status_text(s), losses=s.losses, monitor=s.monitor,
                    monitor_note=s.monitor_note, samples=samples,
                    outputs=[p for p in s.outputs if not p.endswith(".yaml")], warnings=s.warnings,
                    error=s.error, finished=finished, written=written, queue=queue)

    def _checkpoints(self, s: JobState) -> List[str]:
        return [p for p in s.outputs if is_checkpoint_name(p) and not within(p, self.host.lora_dir())]

    def activate(self) -> Reply:
        """Make the last finished job's checkpoint the host's active one."""
        job = self.runner.current
        found = self._checkpoints(job.snapshot()) if job is not None else []
        if not found:
            return Reply("No trained checkpoint to load yet.", ok=False)
        if self._running():  # loading waits for the queue lock, which the running job holds
            return Reply("Training is running; make its checkpoint active once it has finished.", ok=False)
        path = found[-1]
        try:
            self.host.refresh_checkpoints()
            if self.host.set_active_checkpoint(path):
                self.activated_title = self.checkpoint_title(path)  # for the page's own checkpoint dropdown
                return Reply(f"{Path(path).name} is now the active checkpoint.")
        except UserError as e:
            return Reply(str(e), ok=False)
        return Reply(f"This host cannot switch checkpoints; pick {Path(path).name} in its checkpoint list.", ok=False)


# ---------------------------------------------------------------------------------------------
# Text


def _saved_progress(cfg: TrainConfig):
    """The run's saved progress for the reply's wording; an unreadable one is the runner's to refuse."""
    try:
        return read_progress(cfg.workspace_path())
    except Exception:  # noqa: BLE001 - e.g. a corrupt progress.json: the job's own start says what is wrong
        return None


def _start_text(cfg: TrainConfig, saved, resume: bool) -> str:
    if saved is not None and saved.step >= cfg.max_steps:
        return (f"'{cfg.name}' already reached step {saved.step}; its files are written again. Raise the steps "
                "to train on, or choose another name to start afresh.")
    if saved is not None and saved.step > 0:
        return f"Resuming '{cfg.name}' from its saved step {saved.step} of {cfg.max_steps}."
    if resume:
        return f"Nothing saved for '{cfg.name}' yet, so it starts from the beginning."
    return f"Training '{cfg.name}' for {cfg.max_steps} steps."


def _sample_caption(path: str) -> str:
    """Samples live at .../step_000020/<index>-<seed>.png: 'step 20', then '#2' for a second image."""
    p = Path(path)
    step = re.fullmatch(r"step_0*(\d+)", p.parent.name)
    index = re.fullmatch(r"(\d+)-\d+", p.stem)
    if not step:
        return p.name
    return f"step {step.group(1)}" + (f" #{int(index.group(1)) + 1}" if index and int(index.group(1)) else "")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no message"


def _memory_gb(value) -> Optional[float]:
    """The GPU memory typed into the recommendations box; None when left empty (unknown)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = math.nan
    if not (math.isfinite(gb) and 0 < gb <= 4096):
        raise UserError("GPU memory must be a number of GB such as 8, 12 or 24 (or empty when unknown), "
                        f"not {value!r}.")
    return gb


def _is_settings_file(path: Path) -> bool:
    try:
        load_config(path)
        return True
    except UserError:
        return False


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _gpu_has_bf16() -> bool:
    """False only on an NVIDIA GPU without bf16 (before Ampere), where auto mixed precision is fp16."""
    import torch

    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


