"""The extension against what the WebUI really does, as the double now models it (A1111 v1.10.1):

- a checkpoint's title gains ' [hash]' at its first load (sd_models.py CheckpointInfo.calculate_shorthash);
- list_models() empties the list and its aliases before it fills them again (sd_models.py list_models);
- Options.set() swallows an onchange error, puts the old value back and returns False, and refuses
  do_not_save options (options.py Options.set).
"""
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_ext.errors import UserError
from tests.webui_fixtures import (_config, _fake_runner, _wait, add_checkpoint, client, host,  # noqa: F401
                                  started_app, webui)


def _loaded_once(webui, name="base.safetensors") -> Path:
    path = add_checkpoint(webui.models / "Stable-diffusion", name)
    webui.sd_models.list_models()
    webui.sd_models.load_model(webui.sd_models.checkpoint_aliases[name])
    return path


def test_the_double_gives_a_title_its_hash_at_the_first_load(webui):
    sd = webui.sd_models
    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    sd.list_models()
    assert sd.checkpoint_tiles() == ["base.safetensors"]
    sd.load_model()
    [title] = sd.checkpoint_tiles()
    assert title.startswith("base.safetensors [") and len(title) == len("base.safetensors [0123456789]")
    sd.list_models()  # the hash is cached: the title keeps it
    assert sd.checkpoint_tiles() == [title] and webui.shared.opts.sd_model_checkpoint == title
    assert sd.get_closet_checkpoint_match("base.safetensors [0000000000]").title == title


def test_a_title_that_gained_its_hash_still_names_the_file(webui, monkeypatch):
    """The dropdown was filled before the first load; its value no longer is a title, but names the file."""
    from dreambooth_ext.ui.handlers import Handlers

    base = _loaded_once(webui)
    h = host()
    for stale in ("base.safetensors", "base.safetensors [0123abcd99]"):
        assert h.checkpoint_file(stale) == str(base), stale
        assert Handlers(h).checkpoint_path(stale) == str(base)
    assert h.checkpoint_file("base") == str(base)  # the WebUI's name_for_extra alias
    assert h.checkpoint_file("hotdog.safetensors") is None  # no substring guessing
    seen = []
    _fake_runner(monkeypatch, lambda cfg, job: seen.append(cfg) or SimpleNamespace(status="finished", step=0))
    c = client(started_app(webui, api=True))
    r = c.post("/dreambooth/v1/train", json=_config(webui, checkpoint="base.safetensors"))
    assert r.status_code == 200, r.content
    _wait(c)
    assert seen[0].checkpoint == str(base)


def test_options_set_swallows_onchange_errors(webui):
    opts, shared = webui.shared.opts, webui.shared

    def broken():
        raise RuntimeError("cannot load")

    opts.add_option("x_broken", shared.OptionInfo("a", "x", onchange=broken))
    assert opts.set("x_broken", "b") is False and opts.x_broken == "a"
    assert [(k, v, str(e)) for k, v, e in shared.shown_errors] == [("x_broken", "b", "cannot load")]
    info = shared.OptionInfo("a", "y")
    info.do_not_save = True
    opts.add_option("x_unsaved", info)
    assert opts.set("x_unsaved", "b") is False


def test_a_checkpoint_the_webui_cannot_load_is_one_sentence(webui, monkeypatch):
    _loaded_once(webui)
    new = add_checkpoint(webui.models / "Stable-diffusion", "dog_800.safetensors")

    def fails(*args, **kwargs):
        raise RuntimeError("size mismatch for model.diffusion_model.out.2.weight")

    monkeypatch.setattr(webui.sd_models, "load_model", fails)
    with pytest.raises(UserError) as e:
        host().set_active_checkpoint(str(new))
    assert str(e.value) == ("The WebUI could not load dog_800.safetensors (its console says why); pick it in the "
                            "checkpoint list at the top of the page to try again.")
    assert webui.shared.opts.sd_model_checkpoint.startswith("base.safetensors [")  # the old one stays selected


@pytest.fixture
def refresh_watch(webui, monkeypatch):
    """Records, for every list_models(), whether the thread running it holds the queue lock."""
    held = []
    monkeypatch.setattr(webui.sd_models, "between_clear_and_refill",
                        lambda: held.append(webui.call_queue.queue_lock.held_by_me()))
    return held


def test_every_refresh_holds_the_queue_lock(webui, monkeypatch, refresh_watch):
    from dreambooth_ext.ui.handlers import Handlers

    h = host()
    h.refresh_checkpoints()
    Handlers(h).refresh()
    new = add_checkpoint(webui.models / "Stable-diffusion", "dog_800.safetensors")
    assert h.set_active_checkpoint(str(new))  # not listed yet: the adapter refreshes first

    def writes(cfg, job):
        job.start(0, 1)
        job.output(str(add_checkpoint(cfg.checkpoint_path(), f"{cfg.name}_1.safetensors")), "checkpoint")
        return SimpleNamespace(status="finished", step=1)

    _fake_runner(monkeypatch, writes)
    c = client(started_app(webui, api=True))
    assert c.post("/dreambooth/v1/train", json=_config(webui, checkpoint=str(new))).status_code == 200
    _wait(c)
    assert "dog_api_1.safetensors" in webui.sd_models.checkpoint_tiles()  # refreshed before the status turned
    assert len(refresh_watch) >= 4 and all(refresh_watch), refresh_watch


def test_a_generation_waiting_for_the_lock_never_sees_an_empty_list(webui, monkeypatch):
    """A txt2img pressed during training waits for the queue lock, then runs: the list must be full by then."""
    sd, lock = webui.sd_models, webui.call_queue.queue_lock
    base = _loaded_once(webui)
    go, window, running = threading.Event(), threading.Event(), threading.Event()
    # widen the moment list_models() has emptied the list, so a generation let in too early would run in it
    monkeypatch.setattr(sd, "between_clear_and_refill", lambda: window.wait(0.2))

    def trains(cfg, job):
        job.start(0, 1)
        running.set()
        go.wait(30)
        job.output(str(add_checkpoint(cfg.checkpoint_path(), f"{cfg.name}_1.safetensors")), "checkpoint")
        return SimpleNamespace(status="finished", step=1)

    _fake_runner(monkeypatch, trains)
    c = client(started_app(webui, api=True))
    assert c.post("/dreambooth/v1/train", json=_config(webui, checkpoint=str(base))).status_code == 200
    assert running.wait(30)
    generated = []

    def txt2img():  # modules/call_queue.py wrap_queued_call: the generation runs holding the lock
        with lock:
            try:
                generated.append(sd.select_checkpoint().filename)
            except FileNotFoundError as e:
                generated.append(e)

    waiting = threading.Thread(target=txt2img)
    waiting.start()
    go.set()
    waiting.join(30)
    _wait(c)
    assert generated == [str(base)]


def test_the_refresh_button_does_not_wait_for_a_running_job(webui, monkeypatch):
    from dreambooth_ext.jobs import JobRunner
    from dreambooth_ext.ui.handlers import Handlers

    release, running = threading.Event(), threading.Event()

    def trains(cfg, job):
        job.start(0, 1)
        running.set()
        release.wait(30)
        return SimpleNamespace(status="finished", step=1)

    base = _loaded_once(webui)
    runner = JobRunner(train_fn=trains)
    h = Handlers(host(), runner)
    form = h.initial_form()
    form.update({"name": "busy", "concept1.instance_dir": str(webui.models), "concept1.instance_prompt": "a sks dog"})
    assert h.train(form).ok
    assert running.wait(30)
    answered = []
    button = threading.Thread(target=lambda: answered.append(h.refresh()))
    button.start()
    button.join(10)
    release.set()
    assert answered and answered[0] == webui.sd_models.checkpoint_tiles() and str(base)
    assert runner.current.wait(10)


def test_the_tabs_dropdown_follows_a_title_that_gained_its_hash(webui):
    from dreambooth_ext.ui.tab import Tab

    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    webui.sd_models.list_models()
    tab = Tab(host())
    tab.build()
    assert tab.checkpoint.value in ("", None) or tab.checkpoint.value == "base.safetensors"
    webui.sd_models.load_model()  # the first generation loads it: its title gains ' [hash]'
    update = tab._refresh("base.safetensors")
    [title] = webui.sd_models.checkpoint_tiles()
    assert title != "base.safetensors" and update["value"] == title
    assert title in str(update["choices"])
