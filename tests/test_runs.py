"""Run settings: keep_last_models, save_model_on_interrupt, epochs."""

import os

from dreambooth_ext.train.owned_files import read_record
from dreambooth_ext.train.run import train
from tests.trainer_helpers import small_config


def test_keep_last_models_deletes_only_the_runs_own_older_saves(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), train_mode="lora", save_lora_merged=True, max_steps=4,
                       save_model_every=1, keep_last_models=2, num_class_images=0, class_prompt="")
    lora, ckpt = cfg.lora_path(), cfg.checkpoint_path()
    lora.mkdir(parents=True)
    user_file = lora / "tiny_1.safetensors"  # the user's own file under a name the run would use
    user_file.write_bytes(b"mine")
    cfg.save_model_every = 2  # so step 1 is not a planned save (that would be refused as a clash)
    cfg.max_steps = 8
    result = train(cfg)
    assert result.status == "finished"
    assert user_file.read_bytes() == b"mine"
    loras = sorted(p.name for p in lora.iterdir() if p.suffix == ".safetensors")
    assert loras == ["tiny_1.safetensors", "tiny_6.safetensors", "tiny_8.safetensors"]
    assert sorted(p.name for p in lora.iterdir() if p.suffix == ".json") == ["tiny_6.json", "tiny_8.json"]  # cards
    ckpts = sorted(p.name for p in ckpt.iterdir())
    assert [n for n in ckpts if n.endswith(".safetensors")] == ["tiny_6.safetensors", "tiny_8.safetensors"]
    assert sorted(os.path.basename(p) for p in result.outputs if p.endswith(".safetensors")) == \
        ["tiny_6.safetensors", "tiny_6.safetensors", "tiny_8.safetensors", "tiny_8.safetensors"]
    assert str(user_file) not in "".join(read_record(cfg))


def test_an_interrupted_run_writes_its_model_when_asked(tiny_checkpoints, tmp_path):
    from tests.recording import RecordingReporter

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), train_mode="lora", max_steps=6,
                       save_model_on_interrupt=True, num_class_images=0, class_prompt="")
    result = train(cfg, RecordingReporter(stop_at_step=2))
    assert result.status == "cancelled" and result.step == 2
    assert [os.path.basename(p) for p in result.outputs] == ["tiny_2.safetensors"]
    assert (cfg.lora_path() / "tiny_2.safetensors").is_file()
    assert (cfg.workspace_path() / "state" / "progress.json").is_file()  # and it resumes as before
    cfg.save_model_on_interrupt = False
    other = small_config(tmp_path / "b", tiny_checkpoints("sd1"), train_mode="lora", max_steps=6,
                         num_class_images=0, class_prompt="")
    assert train(other, RecordingReporter(stop_at_step=2)).outputs == []
    assert not other.lora_path().exists() or not any(other.lora_path().iterdir())


def test_epochs_set_the_step_count_and_the_tab_shows_both(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.epochs import epoch_note, steps_per_epoch

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), train_mode="lora", max_epochs=2, train_batch_size=2,
                       num_class_images=0, class_prompt="")
    assert steps_per_epoch(cfg) == (6, 3)  # six demo images, two a step
    assert "one epoch = 3 steps; 2 epochs = 6 steps" in epoch_note(cfg)
    cfg.max_epochs = 0
    cfg.max_steps = 9
    assert "9 steps = 3.0 epochs" in epoch_note(cfg)
    cfg.max_epochs = 2
    result = train(cfg)
    assert result.status == "finished" and result.step == 6
    assert [os.path.basename(p) for p in result.outputs] == ["tiny_6.safetensors"]


def test_the_tab_line_counts_steps_per_epoch(tmp_path):
    from dreambooth_ext.jobs import JobRunner
    from dreambooth_ext.ui.handlers import Handlers
    from tests.test_tab import DEMO, FakeHost

    h = Handlers(FakeHost(tmp_path), JobRunner())
    form = h.initial_form()
    assert h.epoch_note(form) == ""  # no images yet: no line
    form.update({"name": "e", "concept1.instance_dir": str(DEMO), "concept1.instance_prompt": "a sks_x toy",
                 "max_steps": 12, "train_batch_size": 3})
    assert h.epoch_note(form) == "6 instance images, batch 3: one epoch = 2 steps; 12 steps = 6.0 epochs."
