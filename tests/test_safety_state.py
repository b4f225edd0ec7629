"""The resumable state: one complete copy always on disk, damage named, leftovers of killed runs cleaned."""

import json
import subprocess
import sys

import pytest

from dreambooth_ext.errors import UserError
from tests.recording import RecordingReporter
from dreambooth_ext.train.run import train
from tests.trainer_helpers import small_config


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stopped_run(tmp_path, tiny_checkpoints, **kw):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=4, num_class_images=0, **kw)
    train(cfg, RecordingReporter(stop_at_step=2))
    return cfg


def test_replacing_the_state_keeps_a_complete_copy_at_every_moment(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.bridge import tensor_io

    cfg = _stopped_run(tmp_path, tiny_checkpoints)
    state = cfg.workspace_path() / "state"
    seen = []
    real = tensor_io.os.replace

    def watch(a, b):
        real(a, b)
        complete = [p for p in state.parent.iterdir()
                    if p.name.startswith((".state.", "state")) and (p / "progress.json").is_file()]
        seen.append(len(complete))

    monkeypatch.setattr(tensor_io.os, "replace", watch)
    train(cfg, RecordingReporter(stop_at_step=3))
    assert seen and min(seen) >= 1
    assert json.loads((state / "progress.json").read_text())["step"] == 3
    assert not [p for p in state.parent.iterdir() if ".previous-" in p.name]


def test_a_kill_between_the_renames_resumes_from_the_copy_left_aside(tiny_checkpoints, tmp_path):
    cfg = _stopped_run(tmp_path, tiny_checkpoints)
    state = cfg.workspace_path() / "state"
    state.rename(state.with_name(f".state.previous-{_dead_pid()}"))  # the old copy moved aside, the new one not in
    reporter = RecordingReporter()
    result = train(cfg, reporter)
    assert result.status == "finished" and reporter.losses[0][0] == 3
    assert any("put back the training state" in s for s in reporter.stages)


@pytest.mark.parametrize("damage,phrase", [
    (lambda p: p.write_text("{not json"), "progress.json is damaged"),
    (lambda p: p.write_text('{"step": "two"}'), "does not hold a step"),
    (lambda p: p.unlink(), "progress.json is missing"),
])
def test_a_damaged_state_is_named_not_silently_restarted(damage, phrase, tiny_checkpoints, tmp_path, capsys):
    from dreambooth_ext.cli import main

    cfg = _stopped_run(tmp_path, tiny_checkpoints)
    state = cfg.workspace_path() / "state"
    damage(state / "progress.json")
    kept = sorted(p.name for p in state.iterdir())
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert phrase in str(e.value) and str(state) in str(e.value) and "delete that folder" in str(e.value)
    assert sorted(p.name for p in state.iterdir()) == kept
    # the command line: the same sentence, no traceback
    from dreambooth_ext.train.config_io import save_config

    save_config(cfg, tmp_path / "cfg.json")
    assert main(["train", "--config", str(tmp_path / "cfg.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0]


def test_a_run_that_trained_before_but_lost_its_state_says_it_starts_fresh(tiny_checkpoints, tmp_path):
    import shutil

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=2, num_class_images=0, save_state_every=100)
    train(cfg, RecordingReporter())
    shutil.rmtree(cfg.workspace_path() / "state")
    reporter = RecordingReporter()
    train(cfg, reporter)
    assert any("starts from step 0" in w for w in reporter.warnings)


def test_stale_temporaries_are_removed_and_live_ones_kept(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=1, num_class_images=0)
    sd = tmp_path / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_file = sd / f".other_5.safetensors.partial-{dead}"
        stale_file.write_bytes(b"x" * 100)
        stale_dir = cfg.workspace_path() / f".state.partial-{dead}"
        stale_dir.mkdir(parents=True)
        (stale_dir / "trained.safetensors").write_bytes(b"x")
        live_file = sd / f".other_5.safetensors.partial-{live.pid}"
        live_file.write_bytes(b"being written")
        reporter = RecordingReporter()
        train(cfg, reporter)
        assert not stale_file.exists() and not stale_dir.exists()
        assert live_file.read_bytes() == b"being written"
        assert any("removed 2 temporary files" in s for s in reporter.stages)
    finally:
        live.kill()
        live.wait()


def test_memory_and_speed_settings_may_change_on_resume(tiny_checkpoints, tmp_path):
    cfg = _stopped_run(tmp_path, tiny_checkpoints)
    cfg.gradient_checkpointing = True
    cfg.attention = "default"
    cfg.cache_text_embeddings = False
    reporter = RecordingReporter()
    assert train(cfg, reporter).status == "finished"
    assert reporter.losses[0][0] == 3
