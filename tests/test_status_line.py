"""The status line the tab, the API and the WebUI's progress bar show: readable stages, and an ETA that
reflects this session's speed (right after a Resume too)."""
from types import SimpleNamespace

from dreambooth_ext import jobs
from dreambooth_ext.jobs import Job, JobState, status_text


def test_conversion_lines_read_as_a_stage():
    def line(stage):
        return status_text(JobState(name="x", status="starting", stage=stage))

    assert line("  vae: 180 tensors") == "starting · converting the base model for training (vae done)"
    assert line("converting base.safetensors (SD 1.x, epsilon) to /m/dreambooth/x/base/model") == \
        "starting · converting base.safetensors (SD 1.x) for training"
    assert line("loading /m/dreambooth/x/base/model") == "starting · loading the base model"
    assert line("class images 3/10") == "starting · class images 3/10"


def test_eta_right_after_resume_counts_only_this_sessions_steps(monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(jobs.time, "time", lambda: clock.now)
    job = Job(SimpleNamespace(name="dog", max_steps=800))
    clock.now += 600  # converting and loading the base before the steps begin
    job.start(400, 800)  # resumed at step 400
    etas = []
    for step, seconds in ((401, 90.0), (402, 1.5), (403, 1.5), (404, 1.5)):  # the first step carries the warm-up
        clock.now += seconds
        job.progress(step, 800, 0.1, 1e-4)
        etas.append(job.snapshot().eta_seconds)
    assert etas[0] is None
    assert etas[1:] == [1.5 * 398, 1.5 * 397, 1.5 * 396]
    assert status_text(job.snapshot()).endswith("ETA 9:54")
