"""Training jobs run one at a time in a background thread; later ones wait in a queue.

The tab, the API and the standalone page drive training through this: start a job from a
config (it runs at once, or waits its turn when another runs), read `snapshot()` while it runs,
`cancel()` it between steps, `remove()` a waiting one, start it again to resume. The queue lives in
the server process, so a page reload or a second browser window sees the same jobs.
"""

import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.reporter import Reporter


ENDED = ("finished", "cancelled", "failed", "removed")  # a job in one of these will not change again


@dataclass
class JobState:
    name: str
    status: str = "starting"  # queued | starting | running | finished | cancelled | failed
    stage: str = ""
    stage_progress: Optional[Tuple[int, int]] = None  # (done, total) of a counted stage (class images)
    step: int = 0
    total: int = 0
    loss: Optional[float] = None
    lr: Optional[float] = None
    eta_seconds: Optional[float] = None
    losses: List[List[float]] = field(default_factory=list)
    monitor: List[Any] = field(default_factory=list)  # the training monitor's points (train/monitor.py), by step
    monitor_note: str = ""  # its closing note: the best step
    samples: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    error: str = ""
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None


class Job(Reporter):
    """A running training: the Reporter the trainer talks to, and the state others read."""

    def __init__(self, cfg, on_event: Optional[Callable[[str, "Job"], None]] = None,
                 around: Optional[Callable] = None):
        self.cfg = cfg
        self.around = around  # wraps the run when its turn comes (the host's GPU lock and progress bar)
        self.host_made_class_images = False  # the host's own generator ran (class_image_generator = webui)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ended = threading.Event()  # set once the job has ended and its "end" event has been handled
        self._state = JobState(name=cfg.name, total=cfg.max_steps)
        self._on_event = on_event
        self._since: Optional[Tuple[int, float]] = None  # (step, time) the ETA's rate is measured from
        self.thread: Optional[threading.Thread] = None

    # --- read from any thread
    def snapshot(self) -> JobState:
        with self._lock:
            s = self._state
            return JobState(**{**s.__dict__, "losses": list(s.losses), "monitor": list(s.monitor),
                               "samples": list(s.samples), "outputs": list(s.outputs), "warnings": list(s.warnings)})

    def cancel(self) -> None:
        self._stop.set()

    @property
    def done(self) -> bool:
        return self.snapshot().status in ENDED

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job has ended (and its end event was handled); False if `timeout` passed first."""
        return self._ended.wait(timeout)

    # --- called by the trainer
    def _update(self, event: str, **changes):
        with self._lock:
            for k, v in changes.items():
                setattr(self._state, k, v)
        try:
            if self._on_event:
                self._on_event(event, self)
        finally:
            if changes.get("status") in ENDED:
                self._ended.set()

    def stage(self, text, done=None, total=None):
        # the monitor's lines carry their figures (a point, or the whole record with the closing note)
        point, record = getattr(text, "point", None), getattr(text, "record", None)
        if point is not None or record is not None:
            with self._lock:
                if record is not None:
                    self._state.monitor, self._state.monitor_note = list(record.points), str(text)
                else:
                    self._state.monitor = [p for p in self._state.monitor if p.step < point.step] + [point]
        text = str(text)
        self._update("stage", stage=text if total is None else f"{text} {done}/{total}",
                     stage_progress=None if total is None else (int(done or 0), int(total)))

    def start(self, first_step, total, history=()):
        self._since = None
        with self._lock:
            self._state.losses = [list(p) for p in history]  # a resumed run's plot starts where it left off
            # the monitor's points are not reset here: a resumed run's earlier ones came with the monitor's
            # first line, before this start (train/training_run.py start_monitor)
        self._update("start", status="running", step=first_step, total=total)

    def progress(self, step, total, loss, lr):
        # The rate counts only this session's steps after its first one: the first step after a start or a
        # Resume carries the warm-up (kernels, memory), and steps saved before a Resume took no time now.
        now, eta = time.time(), None
        if self._since is None:
            self._since = (step, now)
        elif step > self._since[0]:
            eta = (now - self._since[1]) / (step - self._since[0]) * (total - step)
        with self._lock:
            self._state.losses.append([step, loss])
        self._update("progress", step=step, total=total, loss=loss, lr=lr, eta_seconds=eta)

    def sample(self, path, prompt, seed, step):
        with self._lock:
            self._state.samples.append(path)
        self._update("sample")

    def output(self, path, kind):
        with self._lock:
            self._state.outputs.append(path)
        self._update("output")

    def warn(self, text):
        with self._lock:
            self._state.warnings.append(text)
        self._update("warning")

    def should_stop(self) -> bool:
        return self._stop.is_set()


class NameTaken(UserError):
    """A job of that name is running or waiting: a second one would share its workspace and files."""


class JobRunner:
    """Runs one job at a time; a job started while another runs waits in `queue` for its turn.

    Every start is checked at once (a bad config is refused before it waits); a second job with
    the name of a running or waiting one is refused. One worker thread runs the jobs in order."""

    def __init__(self, train_fn: Optional[Callable] = None, precheck_fn: Optional[Callable] = None):
        self._train_fn = train_fn
        # the real trainer's checks run before the reply, so a bad config is answered with its sentence
        self._precheck_fn = precheck_fn
        self._lock = threading.Lock()
        self.current: Optional[Job] = None
        self.queue: List[Job] = []
        self._working = False  # a worker runs `current` or is about to take the next waiting job

    def start(self, cfg, on_event=None, background: bool = True, around: Optional[Callable] = None) -> Job:
        """Start training `cfg`, or queue it behind the running job (its status is then 'queued').
        `around(fn, job)` wraps the run when its turn comes (the WebUI's GPU lock, model offloading)."""
        with self._lock:
            self._check_name(cfg.name)
            self._precheck(cfg)
            job = Job(cfg, on_event, around)
            if self._working:
                job._state.status = "queued"
                self.queue.append(job)
                return job
            self._working = True
            self.current = job
        if background:
            job.thread = threading.Thread(target=self._work, args=(job,), name=f"dreambooth-{cfg.name}", daemon=True)
            job.thread.start()
        else:
            self._work(job)
        return job

    def _check_name(self, name: str) -> None:
        if self._working and self.current is not None and self.current.cfg.name == name:
            raise NameTaken(f"'{name}' is training now; wait for it or interrupt it first.")
        if any(job.cfg.name == name for job in self.queue):
            raise NameTaken(f"'{name}' is already waiting in the queue; remove it from the queue first "
                            "or choose another name.")

    def _precheck(self, cfg) -> None:
        check = self._precheck_fn
        if check is None and self._train_fn is None:
            from dreambooth_ext.train.precheck import precheck as check
        if check is not None:
            check(cfg)

    def _work(self, job: Job) -> None:
        """Run `job`, then each waiting job in turn, in this thread."""
        while job is not None:
            job.thread = threading.current_thread()
            if job.snapshot().status == "queued":  # its turn: it starts now
                job._update("turn", status="starting", started=time.time())
            self._run(job, job.around)
            with self._lock:  # taken under the lock: a start meanwhile queues rather than jumping ahead
                job = self.queue.pop(0) if self.queue else None
                if job is None:
                    self._working = False
                else:
                    self.current = job

    def waiting(self) -> List[JobState]:
        """The queued jobs' states, first to run first."""
        with self._lock:
            return [job.snapshot() for job in self.queue]

    def remove(self, name: str) -> bool:
        """Take a waiting job out of the queue; False when no job of that name waits."""
        with self._lock:
            for job in self.queue:
                if job.cfg.name == name:
                    self.queue.remove(job)
                    job._update("removed", status="removed", finished=time.time())
                    return True
        return False

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._working

    def _run(self, job: Job, around):
        train_fn = self._train_fn
        if train_fn is None:
            from dreambooth_ext.train.run import train as train_fn
        try:
            call = (lambda: train_fn(job.cfg, job))  # noqa: E731
            result = around(call, job) if around else call()
            # a finished run's last stage ("saving the model ...") is over; a stopped one says how to resume
            cleared = {"stage": ""} if result.status == "finished" else {}
            job._update("end", status=result.status, step=result.step, finished=time.time(), **cleared)
        except UserError as e:
            job._update("end", status="failed", error=str(e), finished=time.time())
        except Exception as e:  # a bug or out of memory: keep the message, log the traceback
            message = _explain(e)
            traceback.print_exc()
            job._update("end", status="failed", error=message, finished=time.time())

    def cancel(self) -> bool:
        """Stop the running job after its step (its state is saved); the next waiting job then starts."""
        job = self.current
        if job is None or job.done:
            return False
        job.cancel()
        return True


def _explain(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError":
        return ("The GPU ran out of memory. Lower the resolution or batch size, turn on gradient checkpointing, "
                "use LoRA instead of full training, keep the text encoder frozen, or pick 8-bit AdamW/Adafactor.")
    return f"Training failed: {type(e).__name__}: {text}"




def check_host(cfg, host) -> None:
    """Refuse, before the job starts or waits, what its host cannot do (the tab and the API call this)."""
    if getattr(cfg, "class_image_generator", "builtin") == "webui":
        from dreambooth_ext.train.class_images import NOT_IN_WEBUI

        reason = host.cannot_make_class_images(cfg) if host is not None else NOT_IN_WEBUI
        if reason:
            raise UserError(reason)
    reason = host.refusal(cfg) if host is not None else None
    if reason:
        raise UserError(reason)


def host_hooks(host, title: str, total: int) -> Tuple[Callable, Callable]:
    """(on_event, around) that tie a job to its host: the GPU lock, the host's progress bar, live preview,
    Interrupt and Skip buttons, class images from the host's own txt2img, and a refreshed checkpoint list
    when files were written. The tab and the API share them."""
    wrote = threading.Event()
    skip_noted = threading.Event()

    def around(fn, job: Optional["Job"] = None):
        def with_progress():
            host.progress_begin(title, total)
            try:
                return fn()
            finally:
                host.progress_end()
                if wrote.is_set():  # still holding the queue lock: a waiting generation never sees the list empty
                    _refresh(host)

        if job is not None and getattr(job.cfg, "class_image_generator", "builtin") == "webui":
            def before():  # inside the queue lock, while the WebUI's own model is still where it was
                job.host_made_class_images = True
                host.make_class_images(job.cfg, job)

            return host.run_exclusive(with_progress, before=before)
        return host.run_exclusive(with_progress)

    def on_event(event: str, job: "Job") -> None:
        if event in ("progress", "stage"):
            s = job.snapshot()
            if event == "stage" and s.stage_progress:  # e.g. class images 3/10 on the WebUI's bar
                host.progress_update(s.stage_progress[0], s.stage_progress[1], status_text(s))
            else:
                host.progress_update(s.step, s.total, status_text(s))
            if host.interrupted():  # the WebUI's own Interrupt button
                job.cancel()
            elif host.skipped():  # the WebUI's Skip: only the WebUI's class images have a part to skip
                host.clear_skip()
                if not skip_noted.is_set():
                    skip_noted.set()
                    job.warn(SKIP_IGNORED)
        elif event == "sample":
            s = job.snapshot()
            if s.samples:
                host.preview(s.samples[-1])  # the WebUI's live preview shows the newest sample
        elif event == "output":
            wrote.set()

    return on_event, around


SKIP_IGNORED = ("Skip skips only the rest of the class images the WebUI's txt2img makes; the training goes on "
                "(press Interrupt to stop it with its state saved).")


def _refresh(host) -> None:
    """The host's dropdown shows the new files; a failure here must not hide the training's own result."""
    try:
        host.refresh_checkpoints_locked()
    except Exception:  # noqa: BLE001
        traceback.print_exc()


def status_text(s: JobState) -> str:
    """'running · training on cpu · step 12/40 · loss 0.5454 · ETA 1:07' and the like."""
    parts = [s.status]
    if s.stage and s.status in ("starting", "running", "cancelled"):
        parts.append(readable_stage(s.stage))
    if s.total and s.status not in ("starting", "queued", "removed"):
        parts.append(f"step {s.step}/{s.total}")
    if s.loss is not None:
        parts.append(f"loss {s.loss:.4f}")
    if s.eta_seconds is not None and s.status == "running":
        parts.append(f"ETA {_duration(s.eta_seconds)}")
    return " · ".join(parts)


_CONVERTED = re.compile(r"\s*([\w.-]+): \d+ tensors")  # the bridge's line per converted component
_CONVERTING = re.compile(r"converting (.+?) \((.+?)(?:, [^,)]*)?\) to .*")


def readable_stage(stage: str) -> str:
    """The trainer's and the bridge's progress lines as a user reads them ('converting base.safetensors
    (SD 1.x) for training', not '  vae: 180 tensors' or a workspace path)."""
    text = stage.strip()
    done = _CONVERTED.fullmatch(stage)
    if done:
        return f"converting the base model for training ({done.group(1)} done)"
    converting = _CONVERTING.fullmatch(text)
    if converting:
        return f"converting {converting.group(1)} ({converting.group(2)}) for training"
    if text.startswith("loading ") and ("/" in text or "\\" in text):
        return "loading the base model"
    return text


def _duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


RUNNER = JobRunner()
