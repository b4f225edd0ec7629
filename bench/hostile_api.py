"""Hostile and careless inputs to the /dreambooth/v1/ API and the tab's buttons, as a table to start the next
hostile pass from: the case, the HTTP status (or tab reply), the sentence the user gets, and whether anything
was written outside the allowed folders.

The WebUI is the test double in tests/webui_double (A1111 v1.10.1 names); training is replaced by a stand-in
that records what it was asked to do, so the whole table takes a few seconds on a CPU.
Usage: .venv/bin/python bench/hostile_api.py
"""

import asyncio
import json
import struct
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "webui_double"))


def asgi_call(app, method: str, path: str, body: bytes = b"") -> tuple:
    """(status, parsed body) of one request, straight into the ASGI app."""
    headers = [(b"host", b"bench"), (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("bench", 1), "server": ("bench", 80)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m for m in sent if m["type"] == "http.response.start")["status"]
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(data) if data else None


def snapshot(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


class Bench:
    def __init__(self, tmp: Path):
        from fastapi import FastAPI
        from modules import paths, script_callbacks, scripts, sd_models, shared
        from safetensors.torch import save_file
        import torch

        from dreambooth_ext import jobs

        self.models, self.outside = tmp / "models", tmp / "outside"
        (self.models / "Stable-diffusion").mkdir(parents=True)
        (self.models / "Lora").mkdir()
        self.outside.mkdir()
        (self.outside / "notes.json").write_text('{"mine": true}')
        paths.models_path = str(self.models)
        sd_models.model_path = str(self.models / "Stable-diffusion")
        shared.cmd_opts.lora_dir = str(self.models / "Lora")
        shared.cmd_opts.api = True
        shared.config_filename = str(tmp / "config.json")
        self.base = self.models / "Stable-diffusion" / "base.safetensors"
        save_file({"w": torch.zeros(1)}, str(self.base))
        self.images = self.models / "data" / "dog"
        self.images.mkdir(parents=True)
        self.ran = []
        jobs.RUNNER = jobs.JobRunner(train_fn=lambda cfg, job: self.ran.append(cfg) or SimpleNamespace(
            status="finished", step=0))
        scripts.load_scripts([(str(ROOT), str(ROOT / "scripts" / "dreambooth.py"))])
        script_callbacks.ui_settings_callback()
        self.app = FastAPI()
        script_callbacks.app_started_callback(None, self.app)
        sd_models.list_models()
        sd_models.load_model()  # the title gains its ' [hash]'
        self.rows = []

    def config(self, **changes) -> dict:
        cfg = {"name": "bench", "checkpoint": str(self.base), "max_steps": 3,
               "concepts": [{"instance_dir": str(self.images), "instance_prompt": "a photo of sks dog"}]}
        concept = {k[len("concept_"):]: changes.pop(k) for k in list(changes) if k.startswith("concept_")}
        cfg["concepts"][0].update(concept)
        cfg.update(changes)
        return cfg

    def api(self, case: str, body, method="POST", path="/dreambooth/v1/train"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        before = snapshot(self.outside)
        status, answer = asgi_call(self.app, method, path, raw)
        from dreambooth_ext import jobs

        if jobs.RUNNER.current is not None and jobs.RUNNER.current.thread is not None:
            jobs.RUNNER.current.thread.join(10)
        sentence = answer.get("detail") if isinstance(answer, dict) and "detail" in answer else \
            json.dumps(answer)[:90]
        self.rows.append((f"API {case}", str(status), str(sentence), snapshot(self.outside) != before))

    def tab(self, case: str, fn):
        before = snapshot(self.outside)
        try:
            reply = fn()
            text, ok = reply.text, reply.ok
        except Exception as e:  # noqa: BLE001 - a traceback here is a finding
            text, ok = f"RAISED {type(e).__name__}: {e}", False
        self.rows.append((f"tab {case}", "ok" if ok else "refused", text, snapshot(self.outside) != before))

    def print(self):
        print("| case | status | sentence | written outside? |")
        print("|---|---|---|---|")
        for case, status, sentence, wrote in self.rows:
            short = sentence if len(sentence) <= 160 else sentence[:157] + "..."
            print(f"| {case} | {status} | {short.replace('|', '/')} | {'YES' if wrote else 'no'} |")


def api_rows(b: Bench):
    from dreambooth_ext.folders import path_settings
    from dreambooth_ext.train.config import Concept, TrainConfig

    link = b.models / "data" / "link"
    link.symlink_to(b.outside, target_is_directory=True)
    escapes = {"outside": str(b.outside / "x"), "..": str(b.models / ".." / "outside" / "x"),
               "symlink": str(link / "x")}
    for name in path_settings(TrainConfig) + [f"concept_{n}" for n in path_settings(Concept)]:
        for how, value in escapes.items():
            b.api(f"{name.replace('concept_', 'concept ')} {how}", b.config(**{name: value}))
    b.api("name ../../outside/evil", b.config(name="../../outside/evil"))
    b.api("NUL in workspace_dir", b.config(workspace_dir=str(b.models) + "/a\x00b"))
    b.api("1.1 MB body", b.config(sample_negative_prompt="x" * 1_100_000))
    many = b.config()
    many["concepts"] = many["concepts"] * 101
    b.api("101 concepts", many)
    b.api("101 sample prompts", b.config(sample_prompts=["a"] * 101))
    b.api("5,000-character prompt", b.config(concept_instance_prompt="p" * 5000))
    b.api("not JSON", b"{nope")
    b.api("JSON nested 200,000 deep", b"[" * 200_000 + b"]" * 200_000)
    b.api("a 5,000-digit integer", b'{"seed": 1' + b"0" * 5000 + b"}")
    b.api("not UTF-8", b"\xff\xfe")
    b.api("a list, not an object", [1, 2])
    b.api("unknown setting", b.config(learning_rat=1))
    b.api("dropdown title before its hash", b.config(checkpoint="base.safetensors"))
    folder = b.models / "Stable-diffusion"
    (folder / "odd.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{")
    header = json.dumps({"__metadata__": {"dreambooth_ext.steps": 5}}).encode()
    (folder / "odd2.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    b.api("models listing with two odd headers", None, "GET", "/dreambooth/v1/models")
    b.api("status poll", None, "GET", "/dreambooth/v1/status")


def tab_rows(b: Bench):
    from dreambooth_ext.host.webui import WebUIHost
    from dreambooth_ext.jobs import JobRunner
    from dreambooth_ext.ui.handlers import Handlers

    h = Handlers(WebUIHost(), JobRunner(train_fn=lambda cfg, job: SimpleNamespace(status="finished", step=0)))
    form = h.initial_form()
    form.update({"name": "tabbench", "concept1.instance_dir": str(b.images), "concept1.instance_prompt": "a sks dog"})
    (b.models / "Stable-diffusion" / "other.json").write_text('{"not": "ours"}')
    for case, path in [("Save outside", str(b.outside / "cfg.json")),
                       ("Save over the user's notes.json", str(b.outside / "notes.json")),
                       ("Save via ..", str(b.models / ".." / "outside" / "cfg.json")),
                       ("Save over a checkpoint", str(b.base)),
                       ("Save over another JSON file", str(b.models / "Stable-diffusion" / "other.json")),
                       ("Save with NUL", str(b.models / "a\x00.json")),
                       ("Save inside", str(b.models / "configs" / "run.json"))]:
        b.tab(case, lambda path=path: h.save(form, [], path)[0])
    for case, path in [("Load outside (exists)", str(b.outside / "notes.json")),
                       ("Load outside (missing)", str(b.outside / "missing.json")),
                       ("Load with NUL", "a\x00.json")]:
        b.tab(case, lambda path=path: h.load(path)[2])
    for memory in ("lots", -4, float("nan")):
        b.tab(f"Recommend with memory {memory!r}", lambda memory=memory: h.recommend(form, "sd1", "lora", memory)[1])
    b.tab("Train from a title that gained its hash", lambda: h.train({**form, "checkpoint": "base.safetensors"}))
    from modules import shared

    shared.cmd_opts.webui_is_non_local = True  # --listen: anyone who opens the page may press Train
    b.tab("Train, page open to others, class folder outside",
          lambda: h.train({**form, "name": "open1", "concept1.class_dir": str(b.outside / "class")}))
    b.tab("Train, page open to others, workspace via ..",
          lambda: h.train({**form, "name": "open2", "workspace_dir": str(b.models / ".." / "outside" / "w")}))
    shared.cmd_opts.webui_is_non_local = False


def main():
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(Path(tmp))
        api_rows(b)
        tab_rows(b)
        b.print()
        outside = sum(1 for row in b.rows if row[3])
        print(f"\n{len(b.rows)} cases, {outside} wrote outside the allowed folders.")


if __name__ == "__main__":
    main()
