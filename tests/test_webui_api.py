"""The extension's HTTP routes in the WebUI (A1111 v1.10.1 names, against the double): which routes exist,
who may call them, which paths they accept, and a training job driven through them (exclusive, queued,
interrupted by the WebUI's own button).
"""
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.webui_fixtures import (_config, _fake_runner, _wait, add_checkpoint, client, current_cfg,  # noqa: F401
                                  dreambooth_routes, started_app, webui)


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
    # the job's end event refreshed the WebUI's list before _wait's event was set
    assert "dog_api_3.safetensors" in sd_models.checkpoint_tiles()
    models = c.get("/dreambooth/v1/models").json()["models"]
    assert [(m["name"], m["kind"], m["steps"]) for m in models] == [("dog_api_3", "checkpoint", 3)]  # not base
    cfg = current_cfg()
    assert (cfg.checkpoint, cfg.models_dir) == (str(base), str(webui.models))


def test_a_second_train_waits_in_the_queue_and_can_be_removed(webui, monkeypatch):
    started, ran = threading.Event(), []

    def slow_train(cfg, job):
        ran.append(cfg.name)
        job.start(0, cfg.max_steps)
        started.set()
        while not job.should_stop() and cfg.name == "dog_api":
            job._stop.wait(30)  # until the API's cancel
        return SimpleNamespace(status="cancelled" if job.should_stop() else "finished", step=0)

    runner = _fake_runner(monkeypatch, slow_train)
    c = client(started_app(webui, api=True))
    assert c.post("/dreambooth/v1/train", json=_config(webui)).status_code == 200
    assert started.wait(30)  # the first job runs
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

