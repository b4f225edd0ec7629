"""The training monitor: fidelity and class drift at each sample step, kept with the run, best step named."""

import json
import math

import pytest
from PIL import Image

from dreambooth_ext.errors import UserError
from dreambooth_ext.hostapi import Host
from dreambooth_ext.jobs import JobRunner
from dreambooth_ext.train.monitor import FILE, MonitorRecord, Point, closing_note, describe, read_record
from dreambooth_ext.train.monitor_clip import ClipScorer, mean_paired, mean_pairwise, text_without_token
from dreambooth_ext.train.precheck import precheck
from dreambooth_ext.train.run import train
from tests.clip_helpers import write_tiny_clip
from tests.learning_helpers import FULL, config
from tests.recording import RecordingReporter
from tests.trainer_helpers import DEMO, small_config


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


def test_with_clip_scores_the_best_step_is_the_highest_clip_i_within_the_drift_limit():
    points = [_point(10, 0.9, 0.1), _point(20, 0.5, 0.3), _point(30, 0.4, 0.7)]
    for p, clip_i in zip(points, (0.7, 0.6, 0.9)):
        p.clip_i, p.clip_t, p.class_clip_i = clip_i, 0.25, 0.9
    record = MonitorRecord("a sks thing", "a thing", [1], 10.0, points=points, base_clip_i=0.55, name="run",
                           save_model_every=20, max_steps=30)
    assert record.best_step() == 10  # its CLIP-I beats step 20's though step 20 is nearer in latents
    note = closing_note(record)
    assert note.startswith("monitor: best step 10 (highest CLIP-I") and "0.700 against the base's 0.550" in note
    assert "no model was saved at that step" in note and note.record.best_step() == 10
    record.points[1].clip_i = 0.8
    assert "its model is run_20" in closing_note(record)
    line = describe(points[0])
    assert "CLIP-I 0.700, CLIP-T 0.250, class CLIP-I 0.900" in line and line.point is points[0]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_scores_of_a_tiny_clip_model(tiny_clip):
    scorer = ClipScorer(str(tiny_clip), "cpu")
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())
    pictures = [Image.open(p).convert("RGB") for p in sorted(DEMO.glob("*.png"))[:3]]
    others = [Image.new("RGB", (64, 64), c) for c in ("red", "navy", "olive")]
    a, b, text = scorer.images(pictures), scorer.images(others), scorer.texts(["a character"])
    assert a.shape == (3, scorer.model.config.projection_dim) and text.shape == (1, a.shape[1])
    for figure in (mean_pairwise(a, b), mean_pairwise(a, text), mean_paired(a, b)):
        assert math.isfinite(figure) and -1 <= figure <= 1
    assert mean_pairwise(a[:1], scorer.images(pictures[:1])) == pytest.approx(1.0, abs=1e-5)  # the same picture
    assert mean_paired(a, scorer.images(pictures)) == pytest.approx(1.0, abs=1e-5)
    assert mean_paired(a, b) < 0.9999


def test_the_clip_text_is_the_instance_prompt_without_its_token():
    assert text_without_token("a sks_pixarstyle character", "a pixar-style character") == "a character"
    assert text_without_token("a photo of Sks, dog", "a photo of a dog", "sks") == "a photo of, dog"
    assert text_without_token("a photo of a dog", "a dog") == "a dog"  # no token found: the class prompt


def test_a_bad_clip_folder_is_refused_before_any_work(tmp_path, tiny_checkpoints, tiny_clip):
    base = tiny_checkpoints("sd1")
    vision_only = tmp_path / "vision"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_clip / "config.json").read_text())
    cases = {str(tmp_path / "missing"): "which is not a folder", str(tmp_path): "without a readable config.json",
             str(vision_only): "not a full CLIP model", str(no_weights): "has no weights"}
    for path, words in cases.items():
        cfg = small_config(tmp_path, base, monitor_clip_model=path, sample_every=2)
        with pytest.raises(UserError, match=words) as refused:
            precheck(cfg)
        assert str(refused.value).count(". ") == 0  # one sentence
        with pytest.raises(UserError, match=words):
            train(cfg, RecordingReporter())
        assert not cfg.workspace_path().exists()  # nothing was made: no workspace, no class images
    cfg = small_config(tmp_path, base, monitor_clip_model=str(tiny_clip))
    assert any("sample_every is 0" in w for w in precheck(cfg))


class _Host(Host):
    def __init__(self, root):
        self.root = root

    def models_dir(self):
        return self.root


def test_a_run_with_a_clip_model_keeps_the_clip_scores_and_the_tab_plots_them(tmp_path, tiny_checkpoints, tiny_clip):
    from dreambooth_ext.ui.handlers import Handlers
    from dreambooth_ext.ui.render import monitor_html, monitor_image

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), monitor_clip_model=str(tiny_clip), max_steps=4,
                       sample_every=2, sample_steps=2, num_sample_images=1, save_model_every=2)
    runner = JobRunner()
    job = runner.start(cfg, background=False)
    state = job.snapshot()
    assert state.status == "finished", state.error
    record = read_record(cfg.workspace_path())
    assert [p.step for p in record.points] == [2, 4] and record.clip_text == "a character"
    for p in record.points:
        for figure in (p.clip_i, p.clip_t, p.class_clip_i):
            assert math.isfinite(figure) and -1 <= figure <= 1
    assert -1 <= record.base_clip_i <= 1 and -1 <= record.base_clip_t <= 1
    assert [p.clip_i for p in state.monitor] == [p.clip_i for p in record.points]  # the job carries them
    assert state.monitor_note.startswith("monitor: best step") and "highest CLIP-I" in state.monitor_note
    assert f"its model is tiny_{record.best_step()}" in state.monitor_note
    view = Handlers(_Host(tmp_path / "models"), runner).poll()
    assert [p.step for p in view.monitor] == [2, 4] and view.monitor_note == state.monitor_note
    plot = monitor_image(view)
    assert plot.size == (560, 400) and len(set(plot.getdata())) > 5  # two panels: latent figures and CLIP scores
    assert "best step" in monitor_html(view)


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


def test_a_resumed_run_keeps_the_figures_of_the_steps_before_its_state(tmp_path, tiny_checkpoints):
    settings = dict(max_steps=4, sample_every=2, sample_steps=2, num_sample_images=1, save_state_every=2)
    first = small_config(tmp_path, tiny_checkpoints("sd1"), **settings)
    assert train(first, RecordingReporter()).status == "finished"
    before = read_record(first.workspace_path())
    assert [p.step for p in before.points] == [2, 4]
    seen = []

    def on_event(event, job):
        if event == "start":  # the plot starts with the figures of the steps already trained
            seen.append([p.step for p in job.snapshot().monitor])

    job = JobRunner().start(small_config(tmp_path, tiny_checkpoints("sd1"), **{**settings, "max_steps": 6}),
                            on_event=on_event, background=False)
    state = job.snapshot()
    assert state.status == "finished", state.error
    assert seen == [[2, 4]] and [p.step for p in state.monitor] == [2, 4, 6]
    after = read_record(first.workspace_path())
    assert [p.step for p in after.points] == [2, 4, 6] and after.points[:2] == before.points


def test_the_monitor_reads_prompts_as_the_samples_do(tiny_checkpoints, tmp_path, monkeypatch):
    """Clip skip, long prompts and emphasis reach the monitor's generations (they once went through the
    pipeline's own tokenizer call, which knows none of them)."""
    import dreambooth_ext.train.monitor as monitor
    from dreambooth_ext.train.conditioning import TextOptions

    seen = []
    real = monitor._generate
    monkeypatch.setattr(monitor, "_generate", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=1, sample_every=1, sample_steps=2,
                       num_sample_images=1, clip_skip=2, max_prompt_tokens=150, prompt_weighting=True)
    train(cfg, RecordingReporter())
    assert seen and all(t == TextOptions(2, 2, True) for t in seen)
