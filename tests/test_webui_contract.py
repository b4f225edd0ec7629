"""The extension against a double of the WebUI's modules (A1111 v1.10.1 names; a Forge and an SD.Next variant).

The script is loaded the way the WebUI loads it (modules/scripts.py load_scripts -> script_loading.load_module),
its callbacks are fired like the WebUI fires them, and the adapter is checked against the double. Its HTTP
routes are in test_webui_api.py.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.webui_fixtures import (DOUBLE, ROOT, SCRIPT, add_checkpoint, dreambooth_routes, forge, host,  # noqa: F401
                                  load_script, started_app, webui)


# --- the script and its callbacks


def test_script_registers_its_callbacks_the_way_the_webui_loads_it(webui):
    load_script(webui)
    cmap = webui.callbacks.callback_map
    assert [len(cmap[k]) for k in ("callbacks_ui_tabs", "callbacks_ui_settings", "callbacks_app_started")] == [1, 1, 1]
    assert all(c.script == str(SCRIPT) for cs in cmap.values() for c in cs)


def test_settings_land_in_the_dreambooth_section(webui):
    load_script(webui)
    webui.callbacks.ui_settings_callback()
    assert webui.callbacks.reported == []
    ours = {k: v for k, v in webui.shared.opts.data_labels.items() if k.startswith("dreambooth_")}
    assert set(ours) >= {"dreambooth_workspace_dir", "dreambooth_data_dirs", "dreambooth_offer_activate",
                         "dreambooth_unload_model"}
    assert {v.section for v in ours.values()} == {("dreambooth", "DreamBooth")}
    # the API may not widen the folders it may touch through the WebUI's own /sdapi/v1/options
    assert ours["dreambooth_data_dirs"].restrict_api
    assert not webui.shared.opts.set("dreambooth_data_dirs", "/", is_api=True)


def _tab_module_exists():
    try:
        return importlib.util.find_spec("dreambooth_ext.ui.tab") is not None
    except ImportError:
        return False


def test_the_tab_is_registered_and_builds(webui):
    load_script(webui)
    if not _tab_module_exists():
        pytest.skip("dreambooth_ext/ui/tab.py is not written yet")
    tabs = webui.callbacks.ui_tabs_callback()
    assert webui.callbacks.reported == []
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert (title, elem_id) == ("DreamBooth", "dreambooth")
    import gradio as gr

    assert isinstance(blocks, gr.Blocks)


def test_the_extension_folder_stays_importable_after_the_webui_restores_sys_path(tmp_path):
    """In a clean interpreter: the WebUI drops the extension folder from sys.path after loading the script."""
    code = f"""
import sys
sys.path.insert(0, {str(DOUBLE)!r})
from modules import paths, scripts, script_callbacks, shared
from fastapi import FastAPI
paths.models_path = {str(tmp_path)!r}
scripts.load_scripts([({str(ROOT)!r}, {str(SCRIPT)!r})])
assert {str(ROOT)!r} not in sys.path and 'dreambooth_ext' not in sys.modules
shared.cmd_opts.api = True
script_callbacks.ui_settings_callback()  # A1111 ui.py create_ui(): settings.register_settings(), later the tabs
tabs = script_callbacks.ui_tabs_callback()
app = FastAPI()
script_callbacks.app_started_callback(None, app)
print(script_callbacks.reported, len(tabs), [r.path for r in app.routes if r.path.startswith('/dreambooth')])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[] 1 [") and "/dreambooth/v1/train" in out.stdout, out.stdout


# --- the adapter against the double (A1111)


def test_flavour_is_a1111(webui):
    assert host().flavour == "a1111"


def test_checkpoint_dir_honours_ckpt_dir(webui, tmp_path, monkeypatch):
    h = host()
    assert h.checkpoint_dir() == webui.models / "Stable-diffusion"
    assert h.lora_dir() == webui.models / "Lora"
    monkeypatch.setattr(webui.shared.cmd_opts, "ckpt_dir", str(tmp_path / "ckpts"))
    monkeypatch.setattr(webui.shared.cmd_opts, "lora_dir", str(tmp_path / "loras"))
    assert h.checkpoint_dir() == tmp_path / "ckpts" and h.lora_dir() == tmp_path / "loras"
    assert tmp_path / "ckpts" in h.allowed_roots()


def test_refresh_calls_list_models_and_sees_new_files(webui, tmp_path, monkeypatch):
    h = host()
    assert h.list_checkpoints() == []
    monkeypatch.setattr(webui.shared.cmd_opts, "ckpt_dir", str(tmp_path / "ckpts"))
    new = add_checkpoint(tmp_path / "ckpts", "dog_800.safetensors")
    h.refresh_checkpoints()
    assert webui.sd_models.calls == [("list_models",)]
    assert h.list_checkpoints() == [("dog_800.safetensors", str(new))]


def test_active_checkpoint_and_set_active(webui):
    h = host()
    assert h.active_checkpoint() is None  # no checkpoints: A1111's select_checkpoint raises, we do not
    base = add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    new = add_checkpoint(webui.models / "Stable-diffusion", "dog_800.safetensors")
    h.refresh_checkpoints()
    webui.shared.opts.set("sd_model_checkpoint", "base.safetensors")
    assert h.active_checkpoint() == str(base)
    assert h.set_active_checkpoint(str(new))
    assert webui.sd_models.model_data.sd_model.sd_checkpoint_info.filename == str(new)
    assert h.active_checkpoint() == str(new)
    # the WebUI remembers the title the load gave it: with the ' [hash]' it gained (sd_models.load_model_weights)
    saved = json.loads(Path(webui.shared.config_filename).read_text())["sd_model_checkpoint"]
    assert saved.startswith("dog_800.safetensors [") and webui.sd_models.checkpoint_aliases[saved].filename == str(new)
    assert not h.set_active_checkpoint(str(webui.tmp / "missing.safetensors"))


def test_run_exclusive_holds_the_lock_and_moves_the_model(webui):
    h = host()
    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    h.refresh_checkpoints()
    model = webui.sd_models.load_model()
    lock = webui.call_queue.queue_lock

    def inside():
        return lock.locked(), model.device

    assert h.run_exclusive(inside) == (True, "cpu")
    assert not lock.locked() and model.device == "cuda"

    def boom():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        h.run_exclusive(boom)
    assert not lock.locked() and model.device == "cuda"


def test_run_exclusive_without_a_loaded_model_loads_none(webui):
    h = host()
    assert h.run_exclusive(lambda: 7) == 7
    assert webui.sd_models.model_data.sd_model is None and webui.sd_models.calls == []


def test_run_exclusive_keeps_the_model_when_the_setting_says_so(webui):
    load_script(webui)
    webui.callbacks.ui_settings_callback()
    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    webui.sd_models.list_models()
    model = webui.sd_models.load_model()
    webui.shared.opts.set("dreambooth_unload_model", False)
    assert host().run_exclusive(lambda: model.device) == "cuda"


def test_progress_updates_shared_state(webui):
    h, state = host(), webui.shared.state
    h.progress_end()  # before begin: a no-op, not State.end()'s TypeError on time_start None
    h.progress_begin("dog", 800)
    assert (state.job, state.job_count, state.sampling_steps, state.sampling_step) == ("dreambooth: dog", 1, 800, 0)
    h.progress_update(10, 800, "loss 0.1")
    assert (state.sampling_step, state.textinfo) == (10, "loss 0.1")
    assert not h.interrupted()
    state.interrupt()
    assert h.interrupted()
    h.progress_end()
    assert state.job == "" and state.job_count == 0


def test_api_credentials_parse_api_auth(webui, monkeypatch):
    monkeypatch.setattr(webui.shared.cmd_opts, "api_auth", 'alice:s3cret, "bob":pw')
    assert host().api_credentials() == {"alice": "s3cret", "bob": "pw"}


# --- Forge and SD.Next


def test_forge_variant_does_not_crash(forge):
    from backend import memory_management
    from modules_forge import main_entry

    h = host()
    assert h.flavour == "forge"
    assert h.active_checkpoint() is None  # select_checkpoint() returns None, model_data holds FakeInitialModel
    assert h.run_exclusive(lambda: 3) == 3
    assert memory_management.calls == ["unload_all_models"]
    new = add_checkpoint(forge.models / "Stable-diffusion", "dog_800.safetensors")
    assert h.set_active_checkpoint(str(new))  # found after a refresh
    assert main_entry.changes == ["dog_800.safetensors"]
    assert h.active_checkpoint() == str(new)
    h.progress_begin("dog", 5)
    h.progress_end()
    app = started_app(forge, api=True)
    assert len(dreambooth_routes(app)) == 6
    if _tab_module_exists():
        forge.callbacks.ui_tabs_callback()
        assert forge.callbacks.reported == []


def test_sdnext_variant(webui, monkeypatch):
    """SD.Next: State.begin(title, api), unload_model_weights(op=...), folders in settings."""
    from dreambooth_ext.host.webui import detect_flavour

    monkeypatch.setitem(sys.modules, "modules.sd_checkpoint", SimpleNamespace(__spec__=None))
    assert detect_flavour() == "sdnext"
    calls = []
    sd_models, shared = webui.sd_models, webui.shared

    class SDNextState(type(shared.state)):
        def begin(self, title="", api=None):  # SD.Next modules/shared_state.py: State.begin(title="", api=None)
            calls.append(("begin", title))
            self.interrupted, self.time_start = False, time.time()

        def end(self, api=None):
            calls.append(("end",))

    monkeypatch.setattr(shared, "state", SDNextState())
    monkeypatch.setattr(sd_models, "unload_model_weights", lambda op="model": calls.append(("unload", op)))
    monkeypatch.setattr(sd_models, "reload_model_weights", lambda *a, **k: calls.append(("reload",)))
    shared.opts.add_option("ckpt_dir", shared.OptionInfo(str(webui.tmp / "sdnext_ckpts")))
    h = host("sdnext")
    assert h.checkpoint_dir() == webui.tmp / "sdnext_ckpts"
    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    sd_models.list_models()
    sd_models.load_model()
    h.progress_begin("dog", 4)
    assert h.run_exclusive(lambda: "ok") == "ok"
    h.progress_end()
    assert calls == [("begin", "dreambooth: dog"), ("unload", "model"), ("reload",), ("end",)]


def test_sdnext_checkpoint_list_is_read_from_sd_checkpoint(webui, monkeypatch):
    """SD.Next (431bcc36) modules/sd_checkpoint.py list_models() ends with `checkpoints_list = dict(sorted(...))`:
    the module gets a new dict each time, while modules/sd_models.py keeps the one it imported at start-up.
    A checkpoint written after start-up is only in sd_checkpoint's list; so are its aliases (name without the
    extension, filename), which sd_models does not export at all."""
    import types

    sd_models = webui.sd_models
    folder = webui.models / "Stable-diffusion"
    sd_checkpoint = types.ModuleType("modules.sd_checkpoint")
    sd_checkpoint.checkpoints_list, sd_checkpoint.checkpoint_aliases = {}, {}

    def list_models():  # the shape of SD.Next's list_models(): clear, register, rebind to a sorted copy
        sd_checkpoint.checkpoints_list.clear()
        sd_checkpoint.checkpoint_aliases.clear()
        for path in sorted(folder.glob("*.safetensors")):
            info = SimpleNamespace(name=path.stem, title=path.stem, filename=str(path))
            sd_checkpoint.checkpoints_list[info.title] = info
            for key in (info.name, info.filename, info.title):
                sd_checkpoint.checkpoint_aliases[key] = info
        sd_checkpoint.checkpoints_list = dict(sorted(sd_checkpoint.checkpoints_list.items()))

    monkeypatch.setitem(sys.modules, "modules.sd_checkpoint", sd_checkpoint)
    add_checkpoint(folder, "base.safetensors")
    list_models()
    stale = dict(sd_checkpoint.checkpoints_list)
    monkeypatch.setattr(sd_models, "checkpoints_list", stale)  # what sd_models imported at start-up
    monkeypatch.setattr(sd_models, "list_models", list_models)
    h = host("sdnext")
    new = add_checkpoint(folder, "dog_800.safetensors")
    h.refresh_checkpoints()
    assert ("dog_800", str(new)) in h.list_checkpoints()
    assert "dog_800" not in sd_models.checkpoints_list  # SD.Next's own stale list
    assert h.checkpoint_file("dog_800") == str(new)
    assert h.checkpoint_file(str(new)) == str(new)  # SD.Next's alias: the filename
    assert h._info_for(str(new)).title == "dog_800"


def test_sdnext_a_checkpoint_it_cannot_load_is_one_sentence(webui, monkeypatch):
    """SD.Next (431bcc36) load_diffuser() logs 'not loaded' and returns when diffusers refuses a file: the
    option's onchange raises nothing, Options.set returns True and no model is loaded; seen with a
    non-standard-size SD1 that its single-file loader builds at the sizes of configs/sd15."""
    from dreambooth_ext.errors import UserError

    sd_models, shared = webui.sd_models, webui.shared
    monkeypatch.setitem(sys.modules, "modules.sd_checkpoint", sd_models)  # the list and aliases live there
    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    good = add_checkpoint(webui.models / "Stable-diffusion", "full_2.safetensors")
    bad = add_checkpoint(webui.models / "Stable-diffusion", "tiny_20.safetensors")
    sd_models.list_models()
    sd_models.load_model(sd_models.checkpoint_aliases["base.safetensors"])

    def reload(*args, **kwargs):  # the shape of SD.Next's reload: unload, then load or log and return
        info = sd_models.select_checkpoint()
        sd_models.model_data.sd_model = None
        if info.filename != str(bad):
            sd_models.load_model(info)

    shared.opts.onchange("sd_model_checkpoint", reload, call=False)
    h = host("sdnext")
    assert h.set_active_checkpoint(str(good))
    with pytest.raises(UserError) as e:
        h.set_active_checkpoint(str(bad))
    assert str(e.value) == ("SD.Next could not load tiny_20.safetensors (its console says why); pick another "
                            "checkpoint in the list at the top of the page.")


def test_importing_the_adapter_outside_a_webui_is_harmless():
    out = subprocess.run([sys.executable, "-c", "import dreambooth_ext.host.webui as w; print(w.detect_flavour())"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "a1111", out.stderr
