"""The trainer end to end on tiny models: what it writes, resume, LoRA, other families, and bad input."""

import dataclasses
import errno

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_ext.errors import UserError
from tests.recording import RecordingReporter
from dreambooth_ext.train.run import train
from tests.trainer_helpers import DEMO, TOKEN_PROMPT, small_config


def _models_files(tmp_path):
    root = tmp_path / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _webui_files(tmp_path):
    return [f for f in _models_files(tmp_path) if f.startswith(("Stable-diffusion", "Lora"))]


def test_written_checkpoint_reproduces_the_trained_model(tiny_checkpoints, tmp_path):
    from dreambooth_ext.bridge import single_file_to_diffusers
    from dreambooth_ext.train.models import load_bundle, make_pipeline, open_base

    # save_state_every keeps the final state too: the reference for the written weights
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), text_encoder_mode="full", text_encoder_lr=1e-4,
                       save_state_every=100)
    reporter = RecordingReporter()
    result = train(cfg, reporter)
    assert result.status == "finished" and result.step == 6
    out = tmp_path / "models" / "Stable-diffusion" / "tiny_6.safetensors"
    assert result.outputs == [str(out)] and out.is_file()
    assert out.with_suffix(".yaml").is_file()  # a non-standard size needs its config beside it
    single_file_to_diffusers(out, tmp_path / "back")
    state = load_file(str(tmp_path / "models" / "dreambooth" / "tiny" / "state" / "trained.safetensors"))
    back = load_bundle(tmp_path / "back")
    for key, value in back.unet.state_dict().items():
        assert torch.equal(value, state["unet/" + key]), key
    for key, value in back.text_encoders[0].state_dict().items():
        if key in ("text_model.embeddings.position_ids",):
            continue
        assert torch.equal(value, state["text_encoder/" + key]), key
    base = open_base(cfg.checkpoint, cfg.workspace_path(), progress=lambda _m: None)
    assert not torch.equal(base.unet.conv_in.weight, back.unet.conv_in.weight)  # it did train
    image = make_pipeline(back)(TOKEN_PROMPT, num_inference_steps=2, height=64, width=64,
                                generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_interrupted_run_resumes_to_the_same_weights(tiny_checkpoints, tmp_path):
    ck = tiny_checkpoints("sd1")
    straight = small_config(tmp_path / "a", ck, max_steps=8, hflip=True, center_crop=False,
                            cache_latents=False, lr_scheduler="cosine", lr_warmup_steps=2)
    train(straight, RecordingReporter())
    split = small_config(tmp_path / "b", ck, max_steps=8, hflip=True, center_crop=False,
                         cache_latents=False, lr_scheduler="cosine", lr_warmup_steps=2)
    first = train(split, RecordingReporter(stop_at_step=3))
    assert first.status == "cancelled" and first.step == 3
    assert _webui_files(tmp_path / "b") == []  # nothing for the WebUI until the run ends
    second = RecordingReporter()
    result = train(split, second)
    assert result.status == "finished" and any("resuming" in s for s in second.stages)
    assert second.losses[0][0] == 4
    a = load_file(str(tmp_path / "a" / "models" / "Stable-diffusion" / "tiny_8.safetensors"))
    b = load_file(str(tmp_path / "b" / "models" / "Stable-diffusion" / "tiny_8.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("scheduler,warned", [("cosine", True), ("constant_with_warmup", False)])
def test_a_resume_that_changes_the_length_says_what_it_does_to_a_decaying_schedule(scheduler, warned,
                                                                                   tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=4, lr_scheduler=scheduler, lr_warmup_steps=1)
    assert train(cfg, RecordingReporter(stop_at_step=2)).status == "cancelled"
    longer = RecordingReporter()
    assert train(dataclasses.replace(cfg, max_steps=6), longer).step == 6
    said = [w for w in longer.warnings if "4 steps long and now runs to 6" in w]
    assert bool(said) == warned
    if warned:
        assert "'cosine'" in said[0] and "from step 3 on" in said[0]


class _Crash(RecordingReporter):
    def progress(self, step, total, loss, lr):
        super().progress(step, total, loss, lr)
        if step == 6:
            raise RuntimeError("simulated crash")


def test_crashed_run_resumes_from_its_last_saved_state(tiny_checkpoints, tmp_path):
    ck = tiny_checkpoints("sd1")
    train(small_config(tmp_path / "a", ck, max_steps=8, optimizer="adafactor"), RecordingReporter())
    cfg = small_config(tmp_path / "b", ck, max_steps=8, save_state_every=4, optimizer="adafactor")
    with pytest.raises(RuntimeError):
        train(cfg, _Crash())
    again = RecordingReporter()
    train(cfg, again)
    assert again.losses[0][0] == 5  # from the state saved at step 4
    a = load_file(str(tmp_path / "a" / "models" / "Stable-diffusion" / "tiny_8.safetensors"))
    b = load_file(str(tmp_path / "b" / "models" / "Stable-diffusion" / "tiny_8.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_refuse_to_resume(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=6)
    train(cfg, RecordingReporter(stop_at_step=2))
    cfg.learning_rate = 5e-4
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "learning_rate" in str(e.value) and "state" in str(e.value)


def test_lora_run_writes_a_webui_lora_and_a_merged_checkpoint(tiny_checkpoints, tmp_path):
    import re

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), train_mode="lora", lora_rank=4, lora_learning_rate=1e-2,
                       text_encoder_mode="lora", save_lora_merged=True, max_steps=4)
    result = train(cfg, RecordingReporter())
    lora = tmp_path / "models" / "Lora" / "tiny_4.safetensors"
    assert str(lora) in result.outputs
    keys = load_file(str(lora))
    pattern = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert keys and all(pattern.match(k) for k in keys), [k for k in keys if not pattern.match(k)][:3]
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert any(v.abs().sum() > 0 for k, v in keys.items() if k.endswith("lora_up.weight"))  # it learned
    assert (tmp_path / "models" / "Stable-diffusion" / "tiny_4.safetensors").is_file()


def test_second_phase_starts_from_the_first_phase_lora(tiny_checkpoints, tmp_path):
    ck = tiny_checkpoints("sd1")
    first = small_config(tmp_path / "one", ck, train_mode="lora", lora_rank=4, lora_learning_rate=1e-2, max_steps=3)
    train(first, RecordingReporter())
    phase1 = tmp_path / "one" / "models" / "Lora" / "tiny_3.safetensors"
    # with a zero learning rate the second phase must hand back exactly what it started from
    second = small_config(tmp_path / "two", ck, train_mode="lora", lora_rank=4, lora_learning_rate=0.0,
                          max_steps=2, init_lora=str(phase1), weight_decay=0.0)
    train(second, RecordingReporter())
    a = load_file(str(phase1))
    b = load_file(str(tmp_path / "two" / "models" / "Lora" / "tiny_2.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["sdxl", "sd2-v"])
def test_other_families_train_and_save(family, tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints(family), max_steps=3, num_class_images=1)
    result = train(cfg, RecordingReporter())
    out = tmp_path / "models" / "Stable-diffusion" / "tiny_3.safetensors"
    assert result.outputs == [str(out)]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["dreambooth_ext.steps"] == "3"
    assert meta["modelspec.prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")


def test_bad_image_folders_stop_before_anything_is_written(tiny_checkpoints, tmp_path):
    ck = tiny_checkpoints("sd1")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg at all")
    (broken / "notes.json").write_text("{}")
    for folder, phrase in ((tmp_path / "missing", "does not exist"), (empty, "has no images"),
                           (broken, "no usable images")):
        with pytest.raises(UserError) as e:
            train(small_config(tmp_path, ck, instance_dir=folder), RecordingReporter())
        assert str(folder) in str(e.value) and phrase in str(e.value)
    assert _webui_files(tmp_path) == []


def test_mixed_image_modes_are_used_and_bad_files_skipped(tiny_checkpoints, tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    src = sorted(DEMO.glob("*.png"))[0]
    rgb = Image.open(src).convert("RGB")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    (rgb.convert("I;16")).save(folder / "deep.png")
    rgb.resize((12, 12)).save(folder / "tiny.png")
    (folder / "junk.png").write_bytes(b"\x89PNG broken")
    reporter = RecordingReporter()
    result = train(small_config(tmp_path, tiny_checkpoints("sd1"), instance_dir=folder, max_steps=2), reporter)
    assert result.status == "finished"
    assert any("junk.png" in w for w in reporter.warnings)
    assert any("tiny.png 12x12" in w for w in reporter.warnings)  # used, but the user is told


@pytest.mark.parametrize("change,phrase", [
    ({"max_steps": 0}, "max_steps"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"name": "../escape"}, "name"),
    ({"optimizer": "adamw8bit"}, "NVIDIA GPU"),  # bitsandbytes needs one
    ({"attention": "xformers"}, "xformers"),
])
def test_invalid_settings_stop_before_any_work(change, phrase, tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), **change)
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert phrase in str(e.value)
    assert not (tmp_path / "models").exists()


def test_bucketing_trains_non_square_images_in_their_own_buckets(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.dataset import build_examples

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), bucketing=True, bucket_step=16, max_steps=4,
                       resolution=128, num_class_images=0)
    instances, _ = build_examples(cfg, lambda _w: None)
    assert len({e.bucket for e in instances.examples}) > 1  # the 160x128 and 128x160 pictures differ
    assert train(cfg, RecordingReporter()).status == "finished"
    cfg.bucket_step = 8
    with pytest.raises(UserError) as e:
        train(cfg, RecordingReporter())
    assert "bucket_step" in str(e.value) and "multiple of 16" in str(e.value)


def test_prompt_without_a_token_warns(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=1, num_class_images=0)
    cfg.concepts[0].instance_prompt = "a character"
    reporter = RecordingReporter()
    train(cfg, reporter)
    assert any("token" in w for w in reporter.warnings)


def test_full_disk_while_saving_leaves_no_file(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.bridge import tensor_io

    def full(t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_io, "_tensor_bytes", full)
    with pytest.raises(UserError) as e:
        train(small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=2), RecordingReporter())
    assert "disk filled up" in str(e.value)
    assert not any(f.startswith("Stable-diffusion/") and "tiny" in f for f in _models_files(tmp_path))


def test_job_runner_one_at_a_time_and_out_of_memory_message(tmp_path):
    import threading

    from dreambooth_ext.jobs import JobRunner
    from dreambooth_ext.train.config import TrainConfig

    gate = threading.Event()

    def slow_train(cfg, job):
        gate.wait(5)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner = JobRunner(slow_train)
    job = runner.start(TrainConfig(name="one", max_steps=5))
    with pytest.raises(UserError) as e:
        runner.start(TrainConfig(name="one", max_steps=5))
    assert "'one' is training now" in str(e.value)
    assert runner.start(TrainConfig(name="two", max_steps=5)).snapshot().status == "queued"
    runner.remove("two")
    gate.set()
    job.thread.join(5)
    state = job.snapshot()
    assert state.status == "failed"
    assert "resolution" in state.error and "gradient checkpointing" in state.error and "LoRA" in state.error


def test_job_runner_cancel_then_resume(tiny_checkpoints, tmp_path):
    from dreambooth_ext.jobs import JobRunner

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=30, num_class_images=0)
    runner = JobRunner()
    seen = []

    def on_event(event, job):
        if event == "progress":
            seen.append(job.snapshot().step)
            if job.snapshot().step == 2:
                job.cancel()

    job = runner.start(cfg, on_event=on_event)
    job.thread.join(120)
    assert job.snapshot().status == "cancelled" and job.snapshot().step == 2
    job = runner.start(cfg)
    job.thread.join(300)
    state = job.snapshot()
    assert state.status == "finished" and state.step == 30
    assert [p[0] for p in state.losses] == list(range(1, 31))  # the plot keeps the steps before the stop
    assert state.outputs and state.outputs[0].endswith("tiny_30.safetensors")
