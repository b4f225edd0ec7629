"""The /dreambooth/v1/ API against hostile and careless requests: every path setting kept inside the WebUI's
folders, results where the WebUI looks, bounded requests, one bad model file never failing the listing.

Each test asserts the sentence the client gets and that nothing was written outside the allowed folders.
"""
import json
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_ext.errors import UserError
from dreambooth_ext.folders import path_settings
from dreambooth_ext.train.config import Concept, TrainConfig, describe
from tests.webui_fixtures import (_config, _fake_runner, _wait, add_checkpoint, client, started_app,  # noqa: F401
                                  webui)

TRAIN = "/dreambooth/v1/train"
PATHS = [(name, False) for name in path_settings(TrainConfig)] + [(name, True) for name in path_settings(Concept)]


def _files(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def outside(tmp_path):
    """A folder the API must never touch, with one file in it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "mine.txt").write_text("the user's own file")
    return folder


def test_every_path_like_setting_is_declared_a_path():
    """A setting named like a folder or a file must carry path=True, or the API would not check it."""
    for cls in (TrainConfig, Concept):
        for s in describe(cls):
            looks_like_path = s.name.endswith(("_dir", "_path", "_file")) or s.name in ("checkpoint", "init_lora")
            assert not looks_like_path or s.path, f"{cls.__name__}.{s.name} needs path=True"
    assert {"checkpoint_dir", "lora_dir", "workspace_dir", "models_dir", "init_lora", "checkpoint"} <= \
        set(path_settings(TrainConfig))


def _with(webui, name: str, in_concept: bool, value: str) -> dict:
    return _config(webui, **({f"concept_{name}": value} if in_concept else {name: value}))


@pytest.mark.parametrize("name,in_concept", PATHS)
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_every_path_setting_is_kept_inside_the_allowed_folders(webui, monkeypatch, outside, name, in_concept, how):
    ran = []
    _fake_runner(monkeypatch, lambda cfg, job: ran.append(cfg))
    c = client(started_app(webui, api=True))
    if how == "absolute":
        value = str(outside / "new_folder")
    elif how == "dotdot":
        value = str(webui.models / "Stable-diffusion" / ".." / ".." / "outside" / "new_folder")
    else:
        link = webui.models / "dreambooth_data" / "link"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(outside, target_is_directory=True)
        value = str(link / "new_folder")
    r = c.post(TRAIN, json=_with(webui, name, in_concept, value))
    assert r.status_code == 400, r.content
    detail = r.json()["detail"]
    label = f"{name} of concept 1" if in_concept else name
    assert detail.startswith(f"Setting '{label}' ({value}) is outside the WebUI's models folder"), detail
    assert detail.endswith("add its folder.") and "\n" not in detail
    assert ran == [] and _files(outside) == ["mine.txt"]


def test_a_nul_in_a_path_is_one_sentence(webui, monkeypatch):
    _fake_runner(monkeypatch, None)
    c = client(started_app(webui, api=True))
    r = c.post(TRAIN, json=_config(webui, workspace_dir=str(webui.models) + "/a\x00b"))
    assert r.status_code == 400 and "contains a NUL character" in r.json()["detail"]


def test_api_jobs_use_the_webuis_folders_and_list_their_models(webui, monkeypatch, tmp_path):
    """--ckpt-dir, --lora-dir and Settings > DreamBooth's workspace folder decide where a job writes."""
    ckpts, loras, spaces = tmp_path / "ckpts", tmp_path / "loras", tmp_path / "spaces"
    seen = []

    def fake_train(cfg, job):
        seen.append(cfg)
        job.start(0, cfg.max_steps)
        out = add_checkpoint(cfg.checkpoint_path(), f"{cfg.name}_3.safetensors", {"dreambooth_ext.steps": "3"})
        job.output(str(out), "checkpoint")
        lora = add_checkpoint(cfg.lora_path(), f"{cfg.name}_3.safetensors", {"dreambooth_ext.steps": "3"})
        job.output(str(lora), "lora")
        return SimpleNamespace(status="finished", step=3)

    _fake_runner(monkeypatch, fake_train)
    app = started_app(webui, api=True, ckpt_dir=str(ckpts), lora_dir=str(loras))
    webui.shared.opts.set("dreambooth_workspace_dir", str(spaces))
    add_checkpoint(webui.models / "Stable-diffusion", "base.safetensors")
    c = client(app)
    r = c.post(TRAIN, json=_config(webui, checkpoint=str(webui.models / "Stable-diffusion" / "base.safetensors")))
    assert r.status_code == 200, r.content
    assert _wait(c)["status"] == "finished"
    cfg = seen[0]
    assert (cfg.checkpoint_path(), cfg.lora_path(), cfg.workspace_path()) == (ckpts, loras, spaces / "dog_api")
    models = {(m["kind"], m["path"]) for m in c.get("/dreambooth/v1/models").json()["models"]}
    assert models == {("checkpoint", str(ckpts / "dog_api_3.safetensors")),
                      ("lora", str(loras / "dog_api_3.safetensors"))}
    assert not (webui.models / "Stable-diffusion" / "dog_api_3.safetensors").exists()


def _odd_safetensors(path: Path, header: bytes, declared=None):
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header)


def test_one_odd_model_file_never_fails_the_listing(webui, monkeypatch):
    _fake_runner(monkeypatch, None)
    c = client(started_app(webui, api=True))
    folder = webui.models / "Stable-diffusion"
    good = add_checkpoint(folder, "good_10.safetensors", {"dreambooth_ext.steps": "10"})
    meta_not_text = json.dumps({"__metadata__": {"dreambooth_ext.steps": 5}, "w": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    _odd_safetensors(folder / "a.safetensors", meta_not_text + b"\0" * 4)
    _odd_safetensors(folder / "b.safetensors", b'{"__metadata__": [1, 2]}')
    _odd_safetensors(folder / "c.safetensors", b"{", declared=2**63)
    _odd_safetensors(folder / "d.safetensors", b"\xff\xfe not json")
    (folder / "e.safetensors").write_bytes(b"")
    (folder / "f.safetensors").symlink_to(folder / "f.safetensors")  # a symlink loop
    r = c.get("/dreambooth/v1/models")
    assert r.status_code == 200, r.content
    assert [(m["path"], m["steps"]) for m in r.json()["models"]] == [(str(good), 10)]


def test_request_limits(webui, monkeypatch):
    _fake_runner(monkeypatch, None)
    c = client(started_app(webui, api=True))
    big = _config(webui, sample_negative_prompt="x" * 1_100_000)
    r = c.post(TRAIN, json=big)
    assert r.status_code == 413 and r.json()["detail"].startswith("The request body is larger than 1000 kB")
    many = _config(webui)
    many["concepts"] = many["concepts"] * 101
    r = c.post(TRAIN, json=many)
    assert r.status_code == 422
    assert r.json()["detail"] == "Setting 'concepts' has 101 entries; at most 100 are accepted."
    r = c.post(TRAIN, json=_config(webui, sample_prompts=["a sks dog"] * 101))
    assert r.status_code == 422 and "'sample_prompts' has 101 entries" in r.json()["detail"]
    r = c.post(TRAIN, json=_config(webui, concept_instance_prompt="a photo of sks dog " * 300))
    assert r.status_code == 422 and "'instance_prompt' is 5700 characters long" in r.json()["detail"]


def test_a_body_that_is_not_json_is_one_sentence(webui, monkeypatch):
    _fake_runner(monkeypatch, None)
    app = started_app(webui, api=True)
    from tests.webui_fixtures import _AsgiClient

    raw = _AsgiClient(app)
    for body in (b"{nope", b"[" * 200_000 + b"]" * 200_000, b'{"seed": 1' + b"0" * 5000 + b"}", b"\xff\xfe"):
        r = _raw_post(raw, body)
        assert r.status_code in (400, 422), (body[:20], r.content)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail


def _raw_post(raw, body: bytes):
    return raw.request("POST", TRAIN, raw=body)


def test_status_polls_stay_small(webui, monkeypatch):
    release, reported = threading.Event(), threading.Event()

    def chatty(cfg, job):
        job.start(0, cfg.max_steps)
        for i in range(500):
            job.sample(f"/s/{i}.png", "p", i, 1)
            job.warn(f"warning {i}")
        reported.set()
        release.wait(30)
        return SimpleNamespace(status="finished", step=0)

    _fake_runner(monkeypatch, chatty)
    c = client(started_app(webui, api=True))
    assert c.post(TRAIN, json=_config(webui)).status_code == 200
    assert reported.wait(30)  # the running job has reported all 500 samples and warnings
    s = c.get("/dreambooth/v1/status").json()
    assert len(s["samples"]) == 20 and s["samples"][-1] == "/s/499.png" and len(s["warnings"]) == 20
    release.set()
    _wait(c)


def test_a_refusal_at_the_runners_start_is_the_answer(webui, monkeypatch):
    """The runner's checks before any work (missing images, a changed Resume) come back as the sentence."""
    from dreambooth_ext import jobs

    class Refusing(jobs.JobRunner):
        def start(self, cfg, **kwargs):
            raise UserError("Folder dog has no images; put the pictures of the subject in it.")

    monkeypatch.setattr(jobs, "RUNNER", Refusing())
    c = client(started_app(webui, api=True))
    r = c.post(TRAIN, json=_config(webui))
    assert r.status_code == 400
    assert r.json()["detail"] == "Folder dog has no images; put the pictures of the subject in it."


@pytest.mark.parametrize("workspace_setting", [False, True])
def test_a_name_that_climbs_out_is_refused(webui, monkeypatch, outside, workspace_setting):
    ran = []
    _fake_runner(monkeypatch, lambda cfg, job: ran.append(cfg))
    c = client(started_app(webui, api=True))
    if workspace_setting:
        webui.shared.opts.set("dreambooth_workspace_dir", str(webui.models / "spaces"))
    name = "../../../outside/evil"
    r = c.post(TRAIN, json=_config(webui, name=name))
    assert r.status_code == 400 and r.json()["detail"].startswith(f"Setting 'name' ({name!r}) contains '/'")
    assert ran == [] and _files(outside) == ["mine.txt"]
