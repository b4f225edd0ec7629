"""The training monitor: fidelity and class drift at each sample step, kept with the run, best step named."""

import json

from dreambooth_ext.train.monitor import FILE, MonitorRecord, Point, closing_note, read_record
from tests.recording import RecordingReporter
from dreambooth_ext.train.run import train
from tests.learning_helpers import FULL, config


def _point(step, fidelity, drift):
    return Point(step, fidelity, drift, fidelity * 10, drift * 10)


def test_best_step_is_the_closest_before_drift_passes_the_limit():
    record = MonitorRecord("a sks thing", "a thing", [1], 10.0, drift_limit=0.5,
                           points=[_point(10, 0.9, 0.1), _point(20, 0.6, 0.3), _point(30, 0.4, 0.7)])
    assert record.best_step() == 20  # step 30 is closer but has drifted past the limit
    assert "best step 20" in closing_note(record)
    record.points = [_point(10, 0.9, 0.8)]
    assert record.best_step() is None
    assert "passed 0.5 at every measured step" in closing_note(record)


def test_a_run_measures_at_each_sample_step_and_keeps_the_figures(tmp_path, drawn_base):
    cfg = config(tmp_path, drawn_base, **{**FULL, "max_steps": 60, "sample_every": 20, "num_sample_images": 1,
                                         "sample_guidance": 1.0})
    reporter = RecordingReporter()
    result = train(cfg, reporter)
    record = read_record(cfg.workspace_path())
    assert [p.step for p in record.points] == [20, 40, 60]
    said = [s for s in reporter.stages if s.startswith("monitor at step")]
    assert len(said) == 3 and "fidelity" in said[0] and "class drift" in said[0]
    assert any(s.startswith("monitor: best step") for s in reporter.stages)
    assert result.best_step == record.best_step()
    raw = json.loads((cfg.workspace_path() / FILE).read_text())
    assert raw["class_prompt"] == "a character" and raw["base_distance"] > 0
    # the figures are measured on the trained weights: the class pictures have moved from the base's
    assert all(p.fidelity > 0 and p.drift > 0 for p in record.points)
    assert record.points[-1].drift > record.points[0].drift
