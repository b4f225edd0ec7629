"""The job queue: Train while a job runs makes the new job wait its turn; waiting jobs can be removed.

Fake training functions block on events, so each test decides when a job ends: no timing, no races.
"""
import threading
from types import SimpleNamespace

import pytest

from dreambooth_ext.errors import UserError
from dreambooth_ext.jobs import JobRunner, NameTaken
from dreambooth_ext.train.config import TrainConfig


class Gates:
    """A train_fn whose jobs run until their gate opens; records the order they ran in."""

    def __init__(self):
        self.gates, self.started, self.order = {}, {}, []

    def gate(self, name):
        self.started.setdefault(name, threading.Event())
        return self.gates.setdefault(name, threading.Event())

    def __call__(self, cfg, job):
        self.order.append(cfg.name)
        job.start(0, cfg.max_steps)
        self.gate(cfg.name)
        self.started[cfg.name].set()
        self.gates[cfg.name].wait(30)
        return SimpleNamespace(status="finished", step=cfg.max_steps)

    def finish(self, name, runner):
        job = runner.current
        self.gate(name).set()
        job.thread.join(30)


def _checked(cfg):
    if cfg.max_steps > 1000:
        raise UserError("Setting 'max_steps' is too large for this test.")


@pytest.fixture
def runner_and_gates():
    gates = Gates()
    return JobRunner(train_fn=gates, precheck_fn=_checked), gates


def test_a_second_job_waits_and_runs_after_the_first(runner_and_gates):
    runner, gates = runner_and_gates
    first = runner.start(TrainConfig(name="one", max_steps=3))
    gates.gate("one")
    gates.started["one"].wait(30)
    second = runner.start(TrainConfig(name="two", max_steps=4))
    third = runner.start(TrainConfig(name="three", max_steps=5))
    assert second.snapshot().status == "queued" and third.snapshot().status == "queued"
    assert [s.name for s in runner.waiting()] == ["two", "three"]
    assert runner.current is first

    gates.gate("two")
    gates.gate("one").set()  # the first ends: the worker takes "two" next
    gates.started["two"].wait(30)
    assert first.snapshot().status == "finished" and runner.current is second
    assert [s.name for s in runner.waiting()] == ["three"]
    gates.gate("two").set()
    gates.gate("three").set()
    third_done = threading.Event()
    third._on_event = lambda event, job: event == "end" and third_done.set()
    if not third.done:
        third_done.wait(30)
    assert gates.order == ["one", "two", "three"] and third.snapshot().status == "finished"
    assert not runner.busy and runner.waiting() == []


def test_bad_input_and_a_taken_name_are_refused_at_once(runner_and_gates):
    runner, gates = runner_and_gates
    runner.start(TrainConfig(name="one", max_steps=3))
    gates.started.setdefault("one", threading.Event()).wait(30)
    with pytest.raises(UserError, match="too large"):  # the checks run before the job would wait
        runner.start(TrainConfig(name="big", max_steps=5000))
    with pytest.raises(NameTaken, match="'one' is training now"):
        runner.start(TrainConfig(name="one", max_steps=3))
    runner.start(TrainConfig(name="two", max_steps=3))
    with pytest.raises(NameTaken, match="'two' is already waiting in the queue"):
        runner.start(TrainConfig(name="two", max_steps=9))
    assert [s.name for s in runner.waiting()] == ["two"]
    gates.gate("two").set()
    gates.finish("one", runner)


def test_a_removed_job_never_runs(runner_and_gates):
    runner, gates = runner_and_gates
    runner.start(TrainConfig(name="one", max_steps=3))
    gates.started.setdefault("one", threading.Event()).wait(30)
    removed = runner.start(TrainConfig(name="two", max_steps=3))
    kept = runner.start(TrainConfig(name="three", max_steps=3))
    assert runner.remove("two") and not runner.remove("two") and not runner.remove("one")
    assert removed.snapshot().status == "removed" and removed.done and removed.wait(0)
    gates.gate("three").set()
    gates.finish("one", runner)  # the worker goes on to "three" in the same thread
    kept.thread.join(30)
    assert gates.order == ["one", "three"] and kept.snapshot().status == "finished"


def test_wait_returns_once_the_job_has_ended_and_its_end_was_handled(runner_and_gates):
    runner, gates = runner_and_gates
    handled = []

    def on_event(event, job):
        if event == "end":
            handled.append(job.snapshot().status)

    job = runner.start(TrainConfig(name="one", max_steps=3), on_event=on_event)
    assert gates.started.setdefault("one", threading.Event()).wait(30)
    assert not job.wait(0) and not job.done  # running: it has not ended
    gates.gate("one").set()
    assert job.wait(30) and handled == ["finished"] and job.done


def test_interrupt_stops_the_running_job_and_the_next_starts():
    order, second_started = [], threading.Event()

    def train(cfg, job):
        order.append(cfg.name)
        job.start(0, 10)
        if cfg.name == "two":
            second_started.set()
            return SimpleNamespace(status="finished", step=10)
        while not job.should_stop():
            job._stop.wait(30)
        return SimpleNamespace(status="cancelled", step=1)

    runner = JobRunner(train_fn=train, precheck_fn=lambda cfg: None)
    first = runner.start(TrainConfig(name="one", max_steps=10))
    runner.start(TrainConfig(name="two", max_steps=10))
    assert runner.cancel()
    assert second_started.wait(30)
    first.thread.join(30)
    assert first.snapshot().status == "cancelled" and order == ["one", "two"]


# --- the tab's handlers


class QuietHost:
    """Just enough of a Host for Handlers.poll/remove_queued (train goes through the runner directly)."""

    def lora_dir(self):
        from pathlib import Path

        return Path("/nonexistent-lora")


def test_the_page_lists_the_queue_and_removes_a_waiting_job(runner_and_gates):
    from dreambooth_ext.ui.handlers import Handlers
    from dreambooth_ext.ui.render import view_html

    runner, gates = runner_and_gates
    h = Handlers(QuietHost(), runner)
    runner.start(TrainConfig(name="one", max_steps=3))
    gates.started.setdefault("one", threading.Event()).wait(30)
    runner.start(TrainConfig(name="two", max_steps=3))
    runner.start(TrainConfig(name="three", max_steps=3))

    # a new browser window: a Handlers of its own over the same runner sees the same jobs
    view = Handlers(QuietHost(), runner).poll()
    assert view.running and view.queue == ["two", "three"] and view.status.startswith("running")
    assert "Waiting in the queue:<ol><li>two</li><li>three</li></ol>" in view_html(view)

    reply = h.remove_queued("two")
    assert reply.ok and "Removed 'two'" in reply.text
    assert h.poll().queue == ["three"] and h.poll().key != view.key
    running = h.remove_queued("one")
    assert not running.ok and "press Interrupt" in running.text
    assert not h.remove_queued("nine").ok and not h.remove_queued("").ok
    gates.gate("three").set()
    gates.finish("one", runner)
    runner.current.thread.join(30)
    assert gates.order == ["one", "three"]


def test_train_in_the_tab_queues_and_the_page_shows_the_waiting_job(tmp_path):
    import gradio as gr

    from dreambooth_ext.tiny import write_tiny_checkpoint
    from dreambooth_ext.ui.handlers import Handlers
    from dreambooth_ext.ui.tab import Tab
    from tests.test_tab import DEMO, FakeHost

    host = FakeHost(tmp_path)
    write_tiny_checkpoint("sd1", host.checkpoint_dir() / "tiny-sd1.safetensors")
    gates = Gates()
    runner = JobRunner(train_fn=gates, precheck_fn=lambda cfg: None)
    h = Handlers(host, runner)
    form = h.initial_form()
    form.update({"checkpoint": "tiny-sd1.safetensors", "concept1.instance_dir": str(DEMO),
                 "concept1.instance_prompt": "a sks_pixarstyle character", "max_steps": 5})
    assert h.train({**form, "name": "first"}).ok
    gates.gate("first")
    gates.started["first"].wait(30)
    reply = h.train({**form, "name": "second"})
    assert reply.ok and reply.text == "'second' waits in the queue (number 1); it starts when 'first' has ended."
    again = h.train({**form, "name": "second"})
    assert not again.ok and "already waiting in the queue" in again.text

    tab = Tab(host, Handlers(host, runner))  # a page opened in another browser window
    tab.build()
    polled = tab._page_poll("", "tiny-sd1.safetensors")
    assert "running" in polled[0] and "<li>second</li>" in polled[0]
    assert polled[6]["choices"] in (["second"], [("second", "second")]) and polled[6]["value"] == "second"
    removed = tab._remove("second", polled[-1], "tiny-sd1.safetensors")
    assert "Removed &#x27;second&#x27;" in removed[0] and removed[7]["choices"] == [] and "<li>" not in removed[1]
    assert tab._poll(removed[-1], "tiny-sd1.safetensors")[6] == gr.update()
    gates.finish("first", runner)
    assert gates.order == ["first"]
