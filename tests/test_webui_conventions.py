"""The WebUI's own conventions while a job runs, against the double (A1111 v1.10.1 names):

- Interrupt and Skip of the top bar (modules/shared_state.py State.interrupt/skip, what /sdapi/v1/interrupt
  and /sdapi/v1/skip call), the progress fields and the live preview (State.assign_current_image);
- class images made by the WebUI's own txt2img (modules/processing.py StableDiffusionProcessingTxt2Img and
  process_images) with the base checkpoint, under the queue lock, saved as the built-in generator names them.

Fake training functions stand for the trainer; they read what the WebUI would show at each point.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_ext.errors import UserError
from tests.webui_fixtures import (_config, _fake_runner, _wait, add_checkpoint, client, forge,  # noqa: F401
                                  host, started_app, webui)

CLASS = "a photo of a dog"


def _two_checkpoints(webui):
    """base (to train) and other (the one the WebUI has loaded, on the GPU)."""
    sd = webui.sd_models
    base = add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    add_checkpoint(webui.models / "Stable-diffusion", "other.safetensors")
    sd.list_models()
    sd.load_model(sd.checkpoint_aliases["other.safetensors"])
    return base


def _webui_class_config(webui, count=3, **changes):
    return _config(webui, class_image_generator="webui", prior_loss_weight=1.0, class_image_steps=12,
                   class_image_guidance=5.5, class_image_negative_prompt="blurry", resolution=64, seed=11,
                   concept_class_prompt=CLASS, concept_num_class_images=count, **changes)


def _class_folder():
    """The class folder of the job that ran last (its config with the WebUI's folders filled in)."""
    from dreambooth_ext import jobs

    cfg = jobs.RUNNER.current.cfg
    return cfg.class_path(cfg.concepts[0])


def _recording_train(webui, seen):
    def train(cfg, job):
        seen["folder"] = sorted(p.name for p in Path(cfg.class_path(cfg.concepts[0])).glob("*"))
        seen["model_device"] = webui.sd_models.model_data.sd_model.device
        seen["loaded"] = Path(webui.sd_models.model_data.sd_model.sd_model_checkpoint).name
        job.start(0, cfg.max_steps)
        for step in range(1, cfg.max_steps + 1):
            if job.should_stop():
                return SimpleNamespace(status="cancelled", step=step - 1)
            job.progress(step, cfg.max_steps, 0.1, 1e-4)
        return SimpleNamespace(status="finished", step=cfg.max_steps)

    return train


def test_class_images_come_from_the_webuis_txt2img_with_the_base(webui, monkeypatch):
    from modules import processing

    from dreambooth_ext.train.class_images import class_image_name, image_seed
    from tests.trainer_helpers import count_class_images

    _two_checkpoints(webui)
    monkeypatch.setattr(processing, "calls", [])
    seen = {}
    _fake_runner(monkeypatch, _recording_train(webui, seen))
    c = client(started_app(webui, api=True))
    body = _webui_class_config(webui)
    r = c.post("/dreambooth/v1/train", json=body)
    assert r.status_code == 200, r.content
    assert _wait(c)["status"] == "finished"

    names = [class_image_name(CLASS, i) for i in range(3)]
    folder = _class_folder()
    assert seen["folder"] == sorted(names + [n[:-4] + ".txt" for n in names])  # there before the training began
    assert count_class_images(folder) == 3, list(folder.iterdir())
    assert (folder / (names[0][:-4] + ".txt")).read_text(encoding="utf-8") == CLASS + "\n"
    calls = processing.calls
    assert len(calls) == 3 and all(call["locked"] and call["checkpoint"].endswith("base.safetensors")
                                   for call in calls)
    kw = calls[0]["kwargs"]
    assert (kw["prompt"], kw["negative_prompt"], kw["steps"], kw["cfg_scale"], kw["width"], kw["height"]) == \
        (CLASS, "blurry", 12, 5.5, 64, 64)
    assert (kw["sampler_name"], kw["scheduler"], kw["batch_size"], kw["n_iter"]) == ("DPM++ 2M", "Automatic", 1, 1)
    assert kw["do_not_save_samples"] and kw["do_not_save_grid"]
    assert [call["kwargs"]["seed"] for call in calls] == [image_seed(11, CLASS, i) % 2**32 for i in range(3)]
    # the WebUI's own checkpoint is back (override_settings_restore_afterwards), offloaded for the training
    assert (seen["loaded"], seen["model_device"]) == ("other.safetensors", "cpu")
    assert webui.sd_models.model_data.sd_model.device == "cuda"
    assert webui.shared.opts.sd_model_checkpoint.startswith("other.safetensors")

    # the same run again (a resume) reuses them: nothing is generated again
    r = c.post("/dreambooth/v1/train", json=_webui_class_config(webui))
    assert r.status_code == 200 and _wait(c)["status"] == "finished" and len(processing.calls) == 3


def test_class_images_close_what_the_webuis_txt2img_closes(webui, monkeypatch):
    """Seen in Forge (dfdcbab6): after class images from its txt2img, its console "Total progress" bar stayed
    open and the next txt2img counted on from those steps. The WebUI's txt2img closes each processing object
    and that bar after a generation (modules/txt2img.py, modules/api/api.py text2imgapi); so does the stage."""
    from modules import processing

    _two_checkpoints(webui)
    monkeypatch.setattr(processing, "calls", [])
    monkeypatch.setattr(webui.shared, "total_tqdm", webui.shared.total_tqdm.__class__())
    _fake_runner(monkeypatch, lambda cfg, job: SimpleNamespace(status="finished", step=0))
    c = client(started_app(webui, api=True))
    assert c.post("/dreambooth/v1/train", json=_webui_class_config(webui, count=2)).status_code == 200
    assert _wait(c)["status"] == "finished"
    assert len(processing.calls) == 2 and all(getattr(call["p"], "closed", False) for call in processing.calls)
    bar = webui.shared.total_tqdm
    assert not bar.open and bar.closed == [2 * 12]  # one bar for the stage's 2 images of 12 steps, closed


def test_skip_ends_the_class_images_and_the_training_goes_on(webui, monkeypatch):
    from modules import processing

    _two_checkpoints(webui)
    monkeypatch.setattr(processing, "calls", [])
    pressed = []

    def press_skip_on_the_second(p):
        if len(processing.calls) == 1 and not pressed:
            pressed.append(True)
            webui.shared.state.skip()  # the top bar's Skip, mid-sampling

    monkeypatch.setattr(processing, "during_sampling", press_skip_on_the_second)
    seen = {}
    _fake_runner(monkeypatch, _recording_train(webui, seen))
    c = client(started_app(webui, api=True))
    body = _webui_class_config(webui, count=4)
    assert c.post("/dreambooth/v1/train", json=body).status_code == 200
    s = _wait(c)
    assert s["status"] == "finished" and s["step"] == 3
    from dreambooth_ext.train.class_images import class_image_name

    # the first image is kept, the second (its sampling cut short by Skip) is dropped, no more are made
    assert [n for n in seen["folder"] if n.endswith(".png")] == [class_image_name(CLASS, 0)]
    assert len(processing.calls) == 2 and not webui.shared.state.skipped


def test_interrupt_during_class_images_stops_the_run(webui, monkeypatch):
    from modules import processing

    _two_checkpoints(webui)
    monkeypatch.setattr(processing, "during_sampling", lambda p: webui.shared.state.interrupt())
    seen = {}
    _fake_runner(monkeypatch, _recording_train(webui, seen))
    c = client(started_app(webui, api=True))
    body = _webui_class_config(webui)
    assert c.post("/dreambooth/v1/train", json=body).status_code == 200
    s = _wait(c)
    assert (s["status"], s["step"]) == ("cancelled", 0)
    assert not list(_class_folder().glob("*.png"))


def test_progress_bar_live_preview_and_skip_while_training(webui, monkeypatch, tmp_path):
    from PIL import Image

    state = webui.shared.state
    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    webui.sd_models.list_models()
    sample = tmp_path / "sample.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(sample)
    seen = {}

    def train(cfg, job):
        job.stage("class images", 2, 5)
        seen["class_bar"] = (state.sampling_step, state.sampling_steps)
        job.start(0, 4)
        job.progress(1, 4, 0.2, 1e-4)
        seen["bar"] = (state.job_count, state.job_no, state.sampling_step, state.sampling_steps, state.textinfo)
        job.sample(str(sample), "p", 1, 1)
        seen["preview"] = (state.current_image.getpixel((0, 0)), state.id_live_preview)
        state.skip()  # Skip while training: noted once, cleared, the training goes on
        job.progress(2, 4, 0.2, 1e-4)
        state.skip()
        job.progress(3, 4, 0.2, 1e-4)
        seen["skipped_after"] = state.skipped
        return SimpleNamespace(status="finished", step=3)

    _fake_runner(monkeypatch, train)
    c = client(started_app(webui, api=True))
    assert c.post("/dreambooth/v1/train", json=_config(webui)).status_code == 200
    s = _wait(c)
    assert s["status"] == "finished" and seen["class_bar"] == (2, 5)
    assert seen["bar"][:4] == (1, 0, 1, 4) and "step 1/4" in seen["bar"][4]
    assert seen["preview"] == ((200, 10, 10), 1) and seen["skipped_after"] is False
    assert [w for w in s["warnings"] if w.startswith("Skip skips only")] != [] and len(s["warnings"]) == 1


def test_the_webui_generator_is_refused_where_it_cannot_work(webui, monkeypatch, tmp_path):
    from dreambooth_ext.host.standalone import StandaloneHost
    from dreambooth_ext.jobs import check_host
    from dreambooth_ext.train.class_images import NOT_IN_WEBUI
    from dreambooth_ext.train.config_io import load_config

    _two_checkpoints(webui)
    cfg = load_config(_webui_class_config(webui))
    check_host(cfg, host())  # A1111: fine
    with pytest.raises(UserError) as e:
        check_host(cfg, StandaloneHost(tmp_path / "models"))
    assert str(e.value) == NOT_IN_WEBUI and "set it to 'builtin'" in NOT_IN_WEBUI
    with pytest.raises(UserError, match="not support on SD.Next"):
        check_host(cfg, host("sdnext"))
    unlisted = load_config(_webui_class_config(webui, checkpoint=str(tmp_path / "elsewhere.safetensors")))
    with pytest.raises(UserError, match="does not list the base elsewhere.safetensors"):
        check_host(unlisted, host())


def test_the_cli_refuses_the_webui_generator_before_any_work(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.class_images import NOT_IN_WEBUI
    from dreambooth_ext.train.reporter import ConsoleReporter
    from dreambooth_ext.train.run import train
    from tests.trainer_helpers import small_config

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), class_image_generator="webui")
    with pytest.raises(UserError) as e:
        train(cfg, ConsoleReporter())
    assert str(e.value) == NOT_IN_WEBUI
    assert not cfg.workspace_path().exists()


def test_forge_selects_the_base_for_the_class_images_and_the_previous_one_after(forge, monkeypatch):
    from modules import processing
    from modules_forge import main_entry

    sd = forge.sd_models
    add_checkpoint(forge.models / "Stable-diffusion", "base.safetensors")
    add_checkpoint(forge.models / "Stable-diffusion", "other.safetensors")
    sd.list_models()
    main_entry.checkpoint_change("other.safetensors")
    monkeypatch.setattr(main_entry, "changes", [])
    monkeypatch.setattr(processing, "calls", [])
    _fake_runner(monkeypatch, lambda cfg, job: SimpleNamespace(status="finished", step=0))
    c = client(started_app(forge, api=True))
    assert c.post("/dreambooth/v1/train", json=_webui_class_config(forge, count=2)).status_code == 200
    assert _wait(c)["status"] == "finished"
    # Forge's process_images restores the option without reloading: the extension selects both itself
    assert main_entry.changes == ["base.safetensors", "other.safetensors"]
    assert len(processing.calls) == 2 and processing.calls[0]["kwargs"]["override_settings"] == {}
    assert forge.shared.opts.sd_model_checkpoint == "other.safetensors"


def test_sdnext_refuses_a_ckpt_result_with_its_diffusers_backend(webui, monkeypatch):
    from dreambooth_ext.jobs import check_host
    from dreambooth_ext.train.config_io import load_config

    _two_checkpoints(webui)
    ckpt = load_config(_config(webui, save_format="ckpt"))
    check_host(ckpt, host())  # A1111 lists .ckpt files
    monkeypatch.setattr(webui.shared, "native", True, raising=False)  # SD.Next modules/shared.py: diffusers backend
    with pytest.raises(UserError, match="set it to 'safetensors'"):
        check_host(ckpt, host("sdnext"))
    check_host(load_config(_config(webui)), host("sdnext"))
