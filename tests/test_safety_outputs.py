"""Nothing a user owns is replaced: name clashes, the workspace lock, a full disk at save, NaN runs."""

import errno
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from dreambooth_ext.errors import UserError
from tests.recording import RecordingReporter
from dreambooth_ext.train.run import train
from tests.trainer_helpers import small_config


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sd(tmp_path):
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _temporaries(root):
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".previous-" in p.name]


def test_a_run_never_saves_over_its_own_base(tiny_checkpoints, tmp_path):
    base = _sd(tmp_path) / "mybase_2.safetensors"
    base.write_bytes(tiny_checkpoints("sd1").read_bytes())
    before = _digest(base)
    cfg = small_config(tmp_path, base, name="mybase", max_steps=2, num_class_images=0)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "its own base model" in str(e.value) and str(base) in str(e.value) and "another name" in str(e.value)
    assert _digest(base) == before
    assert not (tmp_path / "models" / "dreambooth").exists()  # refused before any work


def test_someone_elses_file_of_the_same_name_is_never_replaced(tiny_checkpoints, tmp_path):
    theirs = _sd(tmp_path) / "tiny_2.safetensors"
    theirs.write_bytes(b"somebody's model")
    yaml = _sd(tmp_path) / "tiny_1.yaml"  # step 1 is not saved: no clash
    yaml.write_text("keep")
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=2, num_class_images=0)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    msg = str(e.value)
    assert str(theirs) in msg and "was not written by this run" in msg and "another name" in msg
    assert theirs.read_bytes() == b"somebody's model" and yaml.read_text() == "keep"
    cfg.name = "other"
    assert train(cfg, RecordingReporter()).status == "finished"
    assert theirs.read_bytes() == b"somebody's model"


def test_a_run_may_replace_only_what_it_wrote_itself(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=2, num_class_images=0)
    train(cfg, RecordingReporter())
    mine = _sd(tmp_path) / "tiny_2.safetensors"
    assert train(cfg, RecordingReporter()).status == "finished"  # the same run again: its own file
    mine.write_bytes(b"edited by the user")
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert str(mine) in str(e.value)
    assert mine.read_bytes() == b"edited by the user"


def test_a_lora_run_refuses_a_clash_in_the_lora_folder(tiny_checkpoints, tmp_path):
    lora = tmp_path / "models" / "Lora"
    lora.mkdir(parents=True)
    (lora / "tiny_4.safetensors").write_bytes(b"a lora of mine")
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), train_mode="lora", max_steps=4, save_model_every=2,
                       num_class_images=0)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "tiny_4.safetensors" in str(e.value)
    assert (lora / "tiny_4.safetensors").read_bytes() == b"a lora of mine"


def _live_pid():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_second_run_of_the_same_name_is_refused(tiny_checkpoints, tmp_path):
    import json
    import socket
    import time

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=1, num_class_images=0)
    lock = cfg.workspace_path() / "run.lock"
    lock.parent.mkdir(parents=True)
    other = _live_pid()
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": time.time()}))
        with pytest.raises(UserError) as e:
            train(cfg, RecordingReporter())
        msg = str(e.value)
        assert "'tiny' is already training" in msg and str(other.pid) in msg and "another name" in msg
        assert json.loads(lock.read_text())["pid"] == other.pid  # a live run's lock is left alone
    finally:
        other.kill()
        other.wait()
    # its process is gone: the lock is stale and taken over
    assert train(cfg, RecordingReporter()).status == "finished"
    assert not lock.exists()  # released at the end


def test_a_lock_whose_process_id_was_reused_is_stale(tmp_path):
    import json
    import socket
    import time

    from dreambooth_ext.train.workspace_lock import check_free

    other = _live_pid()  # began now, an hour after the lock was written: not the lock's process
    try:
        (tmp_path / "run.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                       "started": time.time() - 3600}))
        check_free("tiny", tmp_path)
    finally:
        other.kill()
        other.wait()


def test_the_lock_refuses_a_second_run_in_the_same_process(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.workspace_lock import workspace_lock

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=1, num_class_images=0)
    with workspace_lock(cfg.name, cfg.workspace_path()):
        with pytest.raises(UserError) as e:
            train(cfg, RecordingReporter())
        assert "already training" in str(e.value)


def test_a_full_disk_at_the_final_ckpt_keeps_the_previous_file_and_the_state(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.bridge import tensor_io

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=2, num_class_images=0, save_format="ckpt",
                       save_state_every=2)
    train(cfg, RecordingReporter())
    ckpt = _sd(tmp_path) / "tiny_2.ckpt"
    before = _digest(ckpt)
    real_save = torch.save

    def full(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(tensor_io.torch, "save", full)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())  # the same run again: it writes tiny_2.ckpt from its saved state
    monkeypatch.setattr(tensor_io.torch, "save", real_save)
    msg = str(e.value)
    assert "disk filled up while writing tiny_2.ckpt" in msg and "previous one is unchanged" in msg
    assert "training state at step 2 is kept" in msg
    assert _digest(ckpt) == before
    assert _temporaries(tmp_path) == []


def test_a_full_disk_while_saving_the_state_keeps_the_previous_state(tiny_checkpoints, tmp_path, monkeypatch):
    import safetensors.torch

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=4, num_class_images=0, save_state_every=100)
    train(cfg, RecordingReporter(stop_at_step=2))
    state = cfg.workspace_path() / "state"
    before = {p.name: _digest(p) for p in state.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    reporter = RecordingReporter()
    result = train(cfg, reporter)  # the model is still written, the state is not
    assert result.status == "finished" and result.outputs
    assert any("training state was not" in w and "disk filled up" in w for w in reporter.warnings)
    assert {p.name: _digest(p) for p in state.iterdir()} == before
    assert _temporaries(tmp_path) == []


def test_a_nan_loss_stops_the_run_and_writes_no_model(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.train import batches

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=6, num_class_images=0, save_state_every=2)
    real = batches.MicroBatch.loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        loss = real(self, *a, **k)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(batches.MicroBatch, "loss", poisoned)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    msg = str(e.value)
    assert "loss became NaN at step 4" in msg and "learning rate" in msg and "broken weights" in msg
    assert not (tmp_path / "models" / "Stable-diffusion").exists()
    from dreambooth_ext.train.state import read_progress

    assert read_progress(cfg.workspace_path()).step == 2  # the last good state is kept


def test_a_base_with_nan_weights_is_refused_before_training(tiny_checkpoints, tmp_path):
    from tests.trainer_helpers import with_one_nan

    broken = tmp_path / "broken.safetensors"
    with_one_nan(tiny_checkpoints("sd1"), broken, "model.diffusion_model.")
    cfg = small_config(tmp_path, broken, max_steps=1, num_class_images=0)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "broken.safetensors holds NaN or infinite values" in str(e.value)
    assert not (cfg.workspace_path() / "base" / "model").exists()
    assert _temporaries(tmp_path) == []
    assert not os.path.exists(tmp_path / "models" / "Stable-diffusion")


def test_a_full_disk_for_both_the_state_and_the_lora_names_both(tiny_checkpoints, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), train_mode="lora", max_steps=2, num_class_images=0)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    msg = str(e.value)
    assert "disk filled up while writing tiny_2.safetensors" in msg and "could not be saved either" in msg
    assert not list((tmp_path / "models").rglob("tiny_2.safetensors"))
    assert _temporaries(tmp_path) == []


def test_a_lock_from_another_machine_says_how_to_clear_it(tmp_path):
    import json

    from dreambooth_ext.train.workspace_lock import check_free

    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(UserError) as e:
        check_free("tiny", tmp_path)
    assert "on elsewhere" in str(e.value) and "delete that lock file" in str(e.value)


def test_a_full_disk_at_a_save_during_the_run_keeps_the_training_so_far(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.bridge import tensor_io

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=4, save_model_every=2, num_class_images=0)

    real = tensor_io.write_safetensors_stream

    def full(path, *a, **k):
        if "Stable-diffusion" not in str(path):
            return real(path, *a, **k)
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_io, "write_safetensors_stream", full)  # the checkpoint cannot be written, the state can
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "disk filled up while writing tiny_2.safetensors" in str(e.value)
    assert "state at step 2 is saved" in str(e.value)
    monkeypatch.undo()
    again = RecordingReporter()
    assert train(cfg, again).status == "finished" and again.losses[0][0] == 3
    assert _temporaries(tmp_path) == []


def test_a_diffusers_folder_base_with_nan_weights_is_refused(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from dreambooth_ext.bridge import single_file_to_diffusers

    folder = tmp_path / "base"
    single_file_to_diffusers(tiny_checkpoints("sd1"), folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, str(weights))
    with pytest.raises(UserError) as e:
        train(small_config(tmp_path, folder, max_steps=1, num_class_images=0), RecordingReporter())
    assert f"The base model {folder} holds NaN or infinite values (vae: {key})" in str(e.value)
    assert not (tmp_path / "models" / "Stable-diffusion").exists()


def test_samples_that_cannot_be_written_do_not_cost_the_model(tiny_checkpoints, tmp_path, monkeypatch):
    from PIL import Image

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=2, sample_every=1, num_sample_images=1,
                       sample_steps=1, num_class_images=0)

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    reporter = RecordingReporter()
    result = train(cfg, reporter)
    assert result.status == "finished" and result.outputs
    assert any("sample image" in w for w in reporter.warnings)


def test_a_read_only_class_folder_reports_the_write_not_the_cleanup(tmp_path, monkeypatch):
    from pathlib import Path

    from PIL import Image

    from dreambooth_ext.train import class_images

    def refuse(self, fp, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Image.Image, "save", refuse)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(UserError) as e:
        class_images._save(Image.new("RGB", (8, 8)), tmp_path, "a dog", 0)
    name = class_images.class_image_name("a dog", 0)
    assert f"{name} cannot be written" in str(e.value) and "read-only" in str(e.value)


def test_a_finished_run_keeps_no_state_unless_its_model_cannot_be_written(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.bridge import tensor_io
    from dreambooth_ext.train.state import read_progress

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=2, num_class_images=0)
    train(cfg, RecordingReporter())
    assert read_progress(cfg.workspace_path()) is None  # the model holds the training; no 3x-size state beside it
    cfg = small_config(tmp_path / "b", tiny_checkpoints("sd1"), max_steps=2, num_class_images=0)
    real = tensor_io.write_safetensors_stream

    def full(path, *a, **k):
        if "Stable-diffusion" not in str(path):
            return real(path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_io, "write_safetensors_stream", full)  # the model cannot be written, the state can
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "training state at step 2 is kept" in str(e.value)
    assert read_progress(cfg.workspace_path()).step == 2  # the trained weights are kept after all
    monkeypatch.setattr(tensor_io, "write_safetensors_stream", real)
    reporter = RecordingReporter()
    result = train(cfg, reporter)  # the same settings again: the model, without training again
    assert result.status == "finished" and result.outputs and reporter.losses == []
