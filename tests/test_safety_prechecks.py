"""Bad input is refused before any work: before the conversion, the class images, and the job's reply."""

import pytest

from dreambooth_ext.errors import UserError
from dreambooth_ext.jobs import JobRunner
from dreambooth_ext.train.precheck import precheck
from dreambooth_ext.train.run import train
from tests.recording import RecordingReporter
from tests.trainer_helpers import DEMO, small_config


def _nothing_written(tmp_path):
    return not (tmp_path / "models").exists()


def _copy_demo(folder):
    folder.mkdir(parents=True)
    for p in DEMO.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.mark.parametrize("where,phrase", [
    ("same", "is the instance image folder"),
    ("inside", "is inside the instance image folder"),
    ("contains", "contains the instance image folder"),
])
def test_a_class_folder_overlapping_the_instance_folder_is_refused(where, phrase, tiny_checkpoints, tmp_path):
    pictures = _copy_demo(tmp_path / "photos" / "me")
    class_dir = {"same": pictures, "inside": pictures / "class", "contains": tmp_path / "photos"}[where]
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), instance_dir=pictures)
    cfg.concepts[0].class_dir = str(class_dir)
    before = sorted(p.name for p in pictures.iterdir())
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert phrase in str(e.value) and "separate class folder" in str(e.value)
    assert sorted(p.name for p in pictures.iterdir()) == before
    assert _nothing_written(tmp_path)


def test_a_name_too_long_for_the_suffixes_is_refused_before_training(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), name="n" * 240)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "240 bytes long" in str(e.value) and "200" in str(e.value)
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("change,phrase", [
    ({"checkpoint_file": "missing.safetensors"}, "does not exist"),
    ({"resolution": 72}, "multiple of 16"),  # the tiny model needs 16; known from the header, not the weights
    ({"bucketing": True, "bucket_step": 8}, "bucket_step"),
    ({"instance_dir": "nowhere"}, "does not exist"),
])
def test_each_check_runs_before_conversion(change, phrase, tiny_checkpoints, tmp_path):
    checkpoint = tmp_path / change.pop("checkpoint_file", tiny_checkpoints("sd1"))
    cfg = small_config(tmp_path, checkpoint, **change)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert phrase in str(e.value)
    assert _nothing_written(tmp_path)  # no converted base, no class images, no lock


def test_an_image_less_folder_is_refused_before_conversion(tiny_checkpoints, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here")
    (folder / "broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(UserError) as e:
        train(small_config(tmp_path, tiny_checkpoints("sd1"), instance_dir=folder), RecordingReporter())
    assert "no usable images" in str(e.value)
    assert _nothing_written(tmp_path)


def test_the_job_reply_is_the_sentence_not_training(tiny_checkpoints, tmp_path):
    """The tab and the API start jobs through JobRunner: a bad config fails in start(), not later."""
    runner = JobRunner()
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), resolution=72)
    with pytest.raises(UserError) as e:
        runner.start(cfg)
    assert "resolution" in str(e.value)
    assert runner.current is None and _nothing_written(tmp_path)


def test_a_resume_with_changed_settings_is_refused_at_the_start_of_the_job(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=4, num_class_images=0)
    train(cfg, RecordingReporter(stop_at_step=2))
    cfg.learning_rate = 5e-4
    with pytest.raises(UserError) as e:
        JobRunner().start(cfg)
    assert "learning_rate" in str(e.value) and "another name" in str(e.value)


def test_precheck_passes_a_good_config_and_returns_its_warnings(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"))
    cfg.concepts[0].instance_prompt = "a character"
    assert any("token" in w for w in precheck(cfg))
    assert _nothing_written(tmp_path)


def test_a_diffusers_folder_base_is_checked_from_its_configs(tiny_checkpoints, tmp_path):
    from dreambooth_ext.bridge import single_file_to_diffusers

    folder = tmp_path / "base"
    single_file_to_diffusers(tiny_checkpoints("sd1"), folder)
    with pytest.raises(UserError) as e:
        precheck(small_config(tmp_path, folder, resolution=72))
    assert "multiple of 16" in str(e.value)


class _StopAtStage(RecordingReporter):
    def __init__(self, words):
        super().__init__()
        self.words = words if isinstance(words, tuple) else (words,)

    def should_stop(self):
        return any(w in s for s in self.stages for w in self.words)


# the base is converted into a folder, or (a single file) built in memory while "loading" it
@pytest.mark.parametrize("stage", [("converting", "loading "), "caching latents"], ids=["base", "caching latents"])
def test_a_stop_works_before_the_training_steps(stage, tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.train import run

    monkeypatch.setattr(run, "ENCODE_AT_FIRST_USE_ON_CPU", False)  # cache up front, as on a GPU
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), num_class_images=0)
    reporter = _StopAtStage(stage)
    result = train(cfg, reporter)
    assert result.status == "cancelled" and result.step == 0 and not reporter.losses
    assert "stopped before training began" in reporter.stages[-1]
    assert not (tmp_path / "models" / "Stable-diffusion").exists()
    assert not (cfg.workspace_path() / "run.lock").exists()
    if stage != "caching latents":
        assert not (cfg.workspace_path() / "base" / "model").exists()


def test_a_job_for_a_name_another_run_holds_is_refused_in_the_reply(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.workspace_lock import workspace_lock

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"))
    runner = JobRunner()
    with workspace_lock(cfg.name, cfg.workspace_path()):  # e.g. the same name training from the command line
        with pytest.raises(UserError) as e:
            runner.start(cfg)
    assert "'tiny' is already training" in str(e.value) and runner.current is None
