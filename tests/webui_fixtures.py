"""The WebUI double as pytest fixtures, and helpers shared by the tests that drive the extension through it.

`webui` puts a fresh double (tests/webui_double, A1111 v1.10.1 names) on sys.path with its models folder in
tmp_path; `forge` adds the Forge fork's modules. `started_app` loads the script the way the WebUI loads it and
fires its callbacks; `client` calls the resulting FastAPI app.
"""
import asyncio
import base64
import json
import sys
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



def _config(webui, **changes):
    images = webui.models / "dreambooth_data" / "dog"
    images.mkdir(parents=True, exist_ok=True)
    cfg = {"name": "dog_api", "checkpoint": str(webui.models / "Stable-diffusion" / "base.safetensors"),
           "max_steps": 3, "concepts": [{"instance_dir": str(images), "instance_prompt": "a photo of sks dog"}]}
    concept = {k[len("concept_"):]: changes.pop(k) for k in list(changes) if k.startswith("concept_")}
    cfg["concepts"][0].update(concept)
    cfg.update(changes)
    return cfg



def current_cfg():
    from dreambooth_ext import jobs

    return jobs.RUNNER.current.cfg


def _fake_runner(monkeypatch, train_fn):
    from dreambooth_ext import jobs

    runner = jobs.JobRunner(train_fn=train_fn)
    monkeypatch.setattr(jobs, "RUNNER", runner)
    return runner


def _wait(c, timeout=30):
    """The API's status once the job it runs has ended: waits on the job's end event (set after the event's
    hooks, such as the WebUI's list refresh, have run), never on a clock."""
    from dreambooth_ext import jobs

    job = jobs.RUNNER.current
    assert job is not None and job.wait(timeout), f"job still {job and job.snapshot()}"
    return c.get("/dreambooth/v1/status").json()
