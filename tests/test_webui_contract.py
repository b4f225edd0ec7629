"""The extension against a double of the WebUI's modules (A1111 v1.10.1 names; a Forge and an SD.Next variant).

The script is loaded the way the WebUI loads it (modules/scripts.py load_scripts -> script_loading.load_module),
its callbacks are fired like the WebUI fires them, and the adapter is checked against the double.
"""
import asyncio
import base64
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
SCRIPT = ROOT / "scripts" / "dreambooth.py"
DOUBLE_PACKAGES = ("modules", "modules_forge", "backend", "forge_patch")


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A fresh double whose models folder is in tmp_path."""
    monkeypatch.syspath_prepend(str(DOUBLE))
    for name in list(sys.modules):
        if name.split(".")[0] in DOUBLE_PACKAGES:
            monkeypatch.delitem(sys.modules, name)
    from modules import call_queue, paths, script_callbacks, sd_models, shared

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Lora").mkdir()
    monkeypatch.setattr(paths, "models_path", str(models))
    monkeypatch.setattr(sd_models, "model_path", str(models / "Stable-diffusion"))
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(models / "Lora"))
    monkeypatch.setattr(shared, "config_filename", str(tmp_path / "config.json"))
    return SimpleNamespace(tmp=tmp_path, models=models, paths=paths, shared=shared, sd_models=sd_models,
                           callbacks=script_callbacks, call_queue=call_queue)


@pytest.fixture
def forge(webui, monkeypatch):
    monkeypatch.syspath_prepend(str(DOUBLE / "forge"))
    import forge_patch

    forge_patch.apply(monkeypatch)
    return webui


def load_script(webui):
    from modules import scripts

    [module] = scripts.load_scripts([(str(ROOT), str(SCRIPT))])
    assert webui.callbacks.reported == []
    return module


def add_checkpoint(folder: Path, name: str, metadata=None) -> Path:
    from safetensors.torch import save_file
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    save_file({"w": torch.zeros(1)}, str(path), metadata=metadata)
    return path


def host(flavour=None):
    from dreambooth_ext.host.webui import WebUIHost

    return WebUIHost(flavour)


# --- an HTTP client for the app: starlette's TestClient where the installed httpx suits it


class _Response:
    def __init__(self, status_code, body):
        self.status_code, self.content = status_code, body

    def json(self):
        return json.loads(self.content)


class _AsgiClient:
    """Calls the ASGI app directly: starlette 0.26's TestClient passes app= to httpx, which httpx 0.28 dropped."""

    def __init__(self, app):
        self.app = app

    def request(self, method, path, json_body=None, auth=None, raw=None):
        body = raw if raw is not None else json.dumps(json_body).encode() if json_body is not None else b""
        headers = [(b"host", b"testserver"), (b"content-length", str(len(body)).encode())]
        if json_body is not None or raw is not None:
            headers.append((b"content-type", b"application/json"))
        if auth:
            headers.append((b"authorization", b"Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode())))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": headers, "client": ("testclient", 50000), "server": ("testserver", 80)}
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        return _Response(start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))

    def get(self, path, auth=None):
        return self.request("GET", path, auth=auth)

    def post(self, path, json=None, auth=None):
        return self.request("POST", path, json_body=json, auth=auth)


def client(app):
    from fastapi.testclient import TestClient

    try:
        return TestClient(app)
    except TypeError:
        return _AsgiClient(app)


def started_app(webui, **flags):
    from fastapi import FastAPI

    for key, value in flags.items():
        setattr(webui.shared.cmd_opts, key, value)
    load_script(webui)
    webui.callbacks.ui_settings_callback()
    app = FastAPI()
    webui.callbacks.app_started_callback(None, app)
    assert webui.callbacks.reported == []
    return app


def dreambooth_routes(app):
    return sorted(r.path for r in app.routes if r.path.startswith("/dreambooth/"))


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


# --- API routes


def test_no_routes_without_api_flag(webui):
    app = started_app(webui, api=False)
    assert dreambooth_routes(app) == []


def test_routes_with_api_flag_and_no_auth(webui, monkeypatch):
    _fake_runner(monkeypatch, None)
    app = started_app(webui, api=True)
    assert dreambooth_routes(app) == ["/dreambooth/v1/cancel", "/dreambooth/v1/models", "/dreambooth/v1/queue",
                                      "/dreambooth/v1/queue/{name}", "/dreambooth/v1/status", "/dreambooth/v1/train"]
    c = client(app)
    assert c.get("/dreambooth/v1/status").json() == {"status": "idle"}
    assert c.get("/dreambooth/v1/models").json() == {"models": []}


def test_api_auth_guards_every_route(webui, monkeypatch):
    _fake_runner(monkeypatch, None)
    c = client(started_app(webui, api=True, api_auth="alice:s3cret,bob:pw"))
    for method, path in [("get", "/dreambooth/v1/status"), ("get", "/dreambooth/v1/models"),
                         ("post", "/dreambooth/v1/cancel"), ("post", "/dreambooth/v1/train"),
                         ("get", "/dreambooth/v1/queue"), ("delete", "/dreambooth/v1/queue/x")]:
        call = (lambda p, **kw: c.request("DELETE", p, **kw)) if method == "delete" else getattr(c, method)
        assert call(path).status_code == 401, path
        assert call(path, auth=("alice", "wrong")).status_code == 401, path
    assert c.get("/dreambooth/v1/status", auth=("alice", "s3cret")).status_code == 200
    assert c.get("/dreambooth/v1/models", auth=("bob", "pw")).status_code == 200
    assert c.post("/dreambooth/v1/cancel", auth=("bob", "pw")).json() == {"cancelled": False}


def _config(webui, **changes):
    images = webui.models / "dreambooth_data" / "dog"
    images.mkdir(parents=True, exist_ok=True)
    cfg = {"name": "dog_api", "checkpoint": str(webui.models / "Stable-diffusion" / "base.safetensors"),
           "max_steps": 3, "concepts": [{"instance_dir": str(images), "instance_prompt": "a photo of sks dog"}]}
    concept = {k[len("concept_"):]: changes.pop(k) for k in list(changes) if k.startswith("concept_")}
    cfg["concepts"][0].update(concept)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("change", [
    {"concept_instance_dir": "/etc"},
    {"concept_class_dir": "/tmp/../etc/cron.d"},
    {"checkpoint": "/etc/passwd"},
    {"models_dir": "/"},
    {"workspace_dir": "/var/tmp/dreambooth"},
    {"init_lora": "/root/x.safetensors", "train_mode": "lora"},
])
def test_paths_outside_the_allowed_folders_are_refused(webui, change):
    c = client(started_app(webui, api=True))
    r = c.post("/dreambooth/v1/train", json=_config(webui, **change))
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "outside the WebUI's models folder" in detail and detail.count(".") >= 1
    assert "\n" not in detail


def test_relative_and_symlinked_escapes_are_refused(webui, tmp_path):
    c = client(started_app(webui, api=True))
    escape = str(webui.models / ".." / ".." / "elsewhere")
    assert c.post("/dreambooth/v1/train", json=_config(webui, concept_instance_dir=escape)).status_code == 400
    outside = tmp_path / "outside"
    outside.mkdir()
    link = webui.models / "link"
    link.symlink_to(outside, target_is_directory=True)
    assert c.post("/dreambooth/v1/train", json=_config(webui, concept_instance_dir=str(link))).status_code == 400


def current_cfg():
    from dreambooth_ext import jobs

    return jobs.RUNNER.current.cfg


def _fake_runner(monkeypatch, train_fn):
    from dreambooth_ext import jobs

    runner = jobs.JobRunner(train_fn=train_fn)
    monkeypatch.setattr(jobs, "RUNNER", runner)
    return runner


def _wait(c, statuses=("finished", "cancelled", "failed")):
    for _ in range(200):
        s = c.get("/dreambooth/v1/status").json()
        if s["status"] in statuses:
            return s
        time.sleep(0.02)
    raise AssertionError(f"job still {s}")


def test_train_runs_exclusively_reports_progress_and_lists_the_model(webui, monkeypatch):
    sd_models, state = webui.sd_models, webui.shared.state
    base = add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    sd_models.list_models()
    sd_models.load_model()  # the WebUI has base loaded on the GPU
    model = sd_models.model_data.sd_model
    seen = {}

    def fake_train(cfg, job):
        seen["locked"] = webui.call_queue.queue_lock.locked()
        seen["device"] = model.device
        job.start(0, cfg.max_steps)
        for step in range(1, cfg.max_steps + 1):
            job.progress(step, cfg.max_steps, 0.5 / step, 1e-4)
            seen.setdefault("bar", []).append((state.sampling_step, state.sampling_steps, state.textinfo))
        out = add_checkpoint(Path(cfg.models_dir) / "Stable-diffusion", f"{cfg.name}_3.safetensors",
                             {"dreambooth_ext.steps": "3", "dreambooth_ext.base_checkpoint": "base.safetensors"})
        job.output(str(out), "checkpoint")
        return SimpleNamespace(status="finished", step=cfg.max_steps)

    _fake_runner(monkeypatch, fake_train)
    c = client(started_app(webui, api=True))
    # a dropdown title names the checkpoint too
    r = c.post("/dreambooth/v1/train", json=_config(webui, checkpoint="base.safetensors"))
    assert r.status_code == 200, r.content
    s = _wait(c)
    assert s["status"] == "finished" and s["step"] == 3 and s["error"] == ""
    assert seen["locked"] and seen["device"] == "cpu"
    assert model.device == "cuda" and not webui.call_queue.queue_lock.locked()
    assert seen["bar"][-1][:2] == (3, 3) and "step 3/3" in seen["bar"][-1][2]
    assert state.job_count == 0  # state.end() ran
    for _ in range(100):  # the job's end event refreshes the WebUI's list right after the status turns
        if "dog_api_3.safetensors" in sd_models.checkpoints_list:
            break
        time.sleep(0.02)
    assert "dog_api_3.safetensors" in sd_models.checkpoint_tiles()
    models = c.get("/dreambooth/v1/models").json()["models"]
    assert [(m["name"], m["kind"], m["steps"]) for m in models] == [("dog_api_3", "checkpoint", 3)]  # not base
    cfg = current_cfg()
    assert (cfg.checkpoint, cfg.models_dir) == (str(base), str(webui.models))


def test_a_second_train_waits_in_the_queue_and_can_be_removed(webui, monkeypatch):
    release, ran = threading.Event(), []

    def slow_train(cfg, job):
        ran.append(cfg.name)
        job.start(0, cfg.max_steps)
        while not job.should_stop() and cfg.name == "dog_api":
            release.wait(30)
        return SimpleNamespace(status="cancelled" if job.should_stop() else "finished", step=0)

    runner = _fake_runner(monkeypatch, slow_train)
    c = client(started_app(webui, api=True))
    assert c.post("/dreambooth/v1/train", json=_config(webui)).status_code == 200
    _wait(c, ("running",))
    second = c.post("/dreambooth/v1/train", json=_config(webui, name="other"))
    third = c.post("/dreambooth/v1/train", json=_config(webui, name="third"))
    assert (second.status_code, second.json()["status"], second.json()["queue_position"]) == (200, "queued", 1)
    assert third.json()["queue_position"] == 2
    same = c.post("/dreambooth/v1/train", json=_config(webui, name="other"))
    assert same.status_code == 409 and "already waiting in the queue" in same.json()["detail"]
    queue = c.get("/dreambooth/v1/queue").json()
    assert queue["running"]["name"] == "dog_api" and [q["name"] for q in queue["queued"]] == ["other", "third"]
    assert c.request("DELETE", "/dreambooth/v1/queue/other").json() == {"removed": "other"}
    gone = c.request("DELETE", "/dreambooth/v1/queue/other")
    assert gone.status_code == 404 and "No job named 'other'" in gone.json()["detail"]
    running = c.request("DELETE", "/dreambooth/v1/queue/dog_api")
    assert running.status_code == 409 and "/cancel" in running.json()["detail"]
    assert c.post("/dreambooth/v1/cancel").json() == {"cancelled": True}
    first = runner.current
    first.thread.join(30)  # the worker ran "third" after the cancelled first job, in the same thread
    assert ran == ["dog_api", "third"] and runner.current.snapshot().status == "finished"
    assert c.get("/dreambooth/v1/queue").json() == {"running": None, "queued": []}


def test_a_checkpoint_the_webui_lists_is_allowed_wherever_it_lies(webui, monkeypatch, tmp_path):
    _fake_runner(monkeypatch, lambda cfg, job: SimpleNamespace(status="finished", step=0))
    c = client(started_app(webui, api=True))
    elsewhere = add_checkpoint(tmp_path / "elsewhere", "given_with_ckpt.safetensors")
    assert c.post("/dreambooth/v1/train", json=_config(webui, checkpoint=str(elsewhere))).status_code == 400
    webui.sd_models.CheckpointInfo(str(elsewhere)).register()  # sd_models.list_models() registers --ckpt so
    assert c.post("/dreambooth/v1/train", json=_config(webui, checkpoint=str(elsewhere))).status_code == 200
    _wait(c)


def test_a_folder_set_in_settings_is_allowed(webui, monkeypatch, tmp_path):
    _fake_runner(monkeypatch, lambda cfg, job: SimpleNamespace(status="finished", step=0))
    c = client(started_app(webui, api=True))
    data = tmp_path / "my_pictures"
    data.mkdir()
    assert c.post("/dreambooth/v1/train", json=_config(webui, concept_instance_dir=str(data))).status_code == 400
    webui.shared.opts.set("dreambooth_data_dirs", str(data))
    assert c.post("/dreambooth/v1/train", json=_config(webui, concept_instance_dir=str(data))).status_code == 200
    _wait(c)


def test_the_webui_interrupt_button_cancels_the_job(webui, monkeypatch):
    def train(cfg, job):
        job.start(0, 100)
        for step in range(1, 101):
            if step == 5:
                webui.shared.state.interrupt()  # the WebUI's own Interrupt button
            job.progress(step, 100, 0.1, 1e-4)
            if job.should_stop():
                return SimpleNamespace(status="cancelled", step=step)
        return SimpleNamespace(status="finished", step=100)

    _fake_runner(monkeypatch, train)
    c = client(started_app(webui, api=True))
    c.post("/dreambooth/v1/train", json=_config(webui))
    s = _wait(c)
    assert (s["status"], s["step"]) == ("cancelled", 5)


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


def test_importing_the_adapter_outside_a_webui_is_harmless():
    out = subprocess.run([sys.executable, "-c", "import dreambooth_ext.host.webui as w; print(w.detect_flavour())"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "a1111", out.stderr
