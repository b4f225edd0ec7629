"""HTTP routes under /dreambooth/v1/: start a training job (it waits in the queue while another runs), read its
progress, cancel it, list and edit the queue, list trained models.

Added to the WebUI's FastAPI app by the adapter when the WebUI runs with --api, behind the same HTTP
Basic credentials as the WebUI's own API. Bodies are plain dicts, so the routes work with pydantic 1
(A1111's fastapi 0.94) and pydantic 2 (Forge's fastapi 0.104) alike. Every path in a posted config
must lie inside a folder the host allows (`roots()`); nothing else is read or written.
"""

import json
import os
import re
import traceback
from pathlib import Path
from secrets import compare_digest
from typing import Any, Callable, Dict, List, Optional

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.concurrency import run_in_threadpool

from dreambooth_ext import jobs
from dreambooth_ext.bridge import is_checkpoint_name
from dreambooth_ext.bridge.tensor_io import SafetensorsSource, sniff_format
from dreambooth_ext.errors import UserError
from dreambooth_ext.folders import apply_host_folders, check_paths
from dreambooth_ext.train.config_io import load_config
from dreambooth_ext.train.config_checks import validate
from dreambooth_ext.train.epochs import resolve_max_steps

PREFIX = "/dreambooth/v1"
# Request limits: far above any real run, far below what would stall the server.
MAX_BODY = 1_000_000  # bytes of a posted config
MAX_TEXT = 4096  # characters of any one text (a prompt, a path)
LIST_LIMITS = {"concepts": 100, "sample_prompts": 100, "sample_seeds": 1000}
STATUS_ITEMS = 20  # newest samples, outputs and warnings a status poll carries
TOO_LARGE = f"The request body is larger than {MAX_BODY // 1000} kB; a training config is a few kB."


def make_auth(credentials: Dict[str, str]):
    """The dependency A1111's modules/api/api.py uses (Api.auth): HTTP Basic against --api-auth."""

    def auth(creds: HTTPBasicCredentials = Depends(HTTPBasic())):
        password = credentials.get(creds.username)
        if password is not None and compare_digest(creds.password.encode(), password.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return auth


# --- the posted config


def check_limits(body: Any) -> None:
    """UserError when a posted config holds more than any real run needs (counts and text lengths)."""
    if not isinstance(body, dict):
        raise UserError("The request body must be a JSON object with the training settings.")
    for key, most in LIST_LIMITS.items():
        values = body.get(key)
        if isinstance(values, list) and len(values) > most:
            raise UserError(f"Setting '{key}' has {len(values)} entries; at most {most} are accepted.")
    for where, text in _strings(body, "the config"):
        if len(text) > MAX_TEXT:
            raise UserError(f"Setting {where} is {len(text)} characters long; at most {MAX_TEXT} are accepted.")


def _strings(value: Any, where: str):
    """(where, text) of every string in a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, f"name {str(k)[:40]!r}")
            yield from _strings(v, f"'{str(k)[:40]}'")
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, where)


def prepare_config(body: dict, host, roots: List[Path]):
    """The TrainConfig for a posted body: host folders filled in, paths checked, settings validated."""
    check_limits(body)
    body = apply_host_folders(body, host)
    checkpoint = body.get("checkpoint")
    if isinstance(checkpoint, str) and checkpoint:  # a checkpoint may be named by its dropdown title
        body["checkpoint"] = host.checkpoint_file(checkpoint) or checkpoint
    check_paths(body, roots, [path for _title, path in host.list_checkpoints()])
    cfg, warnings = validate(load_config(body))
    return resolve_max_steps(cfg), warnings  # max_epochs: the step count the run will have


async def read_json(request: Request) -> Any:
    """The request's JSON body, read no further than MAX_BODY bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPException(status_code=413, detail=TOO_LARGE)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise HTTPException(status_code=413, detail=TOO_LARGE)
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, an integer too long
        raise HTTPException(status_code=422, detail="The request body is not valid JSON; send the training "
                                                    "settings as one JSON object.") from None


# --- trained models


def read_safetensors_metadata(path) -> Dict[str, str]:
    """The `__metadata__` of a .safetensors file, read by the bridge; {} when the file is not readable."""
    try:
        if sniff_format(Path(path)) != "safetensors":
            return {}
        meta = SafetensorsSource(Path(path)).metadata
    except Exception:  # noqa: BLE001 - a header safetensors refuses, a file removed meanwhile
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _job_names(host, runner) -> List[str]:
    names = []
    workspaces = host.workspace_root() or host.models_dir() / "dreambooth"
    if workspaces.is_dir():
        names = [p.name for p in workspaces.iterdir() if p.is_dir()]
    if runner.current is not None:
        names.append(runner.current.cfg.name)
    return names


def _model_entry(path: Path, kind: str, pattern) -> Optional[dict]:
    """The listing entry of one file; None when it is not ours or cannot be read (never an error)."""
    try:
        meta = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
        if "dreambooth_ext.steps" not in meta and not (pattern and pattern.match(path.stem)):
            return None
        steps = meta.get("dreambooth_ext.steps", "")
        return {"name": path.stem, "kind": kind, "path": str(path), "size": path.stat().st_size,
                "steps": int(steps) if steps.isdigit() and len(steps) < 12 else None,
                "base_checkpoint": meta.get("dreambooth_ext.base_checkpoint")}
    except (OSError, ValueError):
        return None


def trained_models(folders: Dict[str, Path], job_names: List[str]) -> List[dict]:
    """Files with our metadata, or named NAME_<step> after a known job (a .ckpt has no metadata).

    One unreadable file is skipped; it never fails the whole listing."""
    pattern = re.compile("^(" + "|".join(re.escape(n) for n in job_names) + r")_\d+$") if job_names else None
    found, seen = [], set()
    for kind, folder in folders.items():
        for dirpath, _dirs, files in os.walk(folder):
            for fname in sorted(files):
                path = Path(dirpath) / fname
                try:
                    key = path.resolve()
                except (OSError, RuntimeError):
                    continue
                if not is_checkpoint_name(path) or key in seen:
                    continue
                entry = _model_entry(path, kind, pattern)
                if entry is not None:
                    seen.add(key)
                    found.append(entry)
    return found


# --- routes


def status_dict(job) -> dict:
    """A job's state for a poll: small whatever the run, so only the newest samples, outputs and warnings."""
    if job is None:
        return {"status": "idle"}
    s = job.snapshot()
    return {"name": s.name, "status": s.status, "stage": s.stage, "step": s.step, "total": s.total,
            "loss": s.loss, "lr": s.lr, "eta": s.eta_seconds, "samples": s.samples[-STATUS_ITEMS:],
            "outputs": s.outputs[-STATUS_ITEMS:], "warnings": s.warnings[-STATUS_ITEMS:], "error": s.error}


def queue_dict(runner) -> dict:
    """GET /queue: the running job (or null) and the waiting ones, first to run first."""
    current = runner.current if runner.current is not None and not runner.current.done else None
    waiting = [{"name": s.name, "position": i, "total": s.total, "status": s.status}
               for i, s in enumerate(runner.waiting(), 1)]
    return {"running": status_dict(current) if current is not None else None, "queued": waiting}


def remove_queued(name: str, runner) -> dict:
    """DELETE /queue/{name}: a waiting job leaves the queue; the running one is stopped with /cancel instead."""
    if runner.remove(name):
        return {"removed": name}
    current = runner.current
    if current is not None and not current.done and current.cfg.name == name:
        raise HTTPException(status_code=409, detail=f"'{name}' is running, not waiting; stop it with "
                                                    f"POST {PREFIX}/cancel.")
    raise HTTPException(status_code=404, detail=f"No job named '{name[:100]}' waits in the queue.")


def start_job(body: Any, host, roots: List[Path], runner) -> dict:
    """What POST /train answers: the new job's state, or an HTTPException carrying one sentence."""
    try:
        check_limits(body)
    except UserError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    try:
        cfg, warnings = prepare_config(body, host, roots)
        jobs.check_host(cfg, host)
        on_event, around = jobs.host_hooks(host, cfg.name, cfg.max_steps)
        job = runner.start(cfg, on_event=on_event, around=around)
    except UserError as e:  # a bad setting, a check before any work (400), or a job of that name (409)
        raise HTTPException(status_code=409 if isinstance(e, jobs.NameTaken) else 400, detail=str(e)) from None
    except Exception as e:  # noqa: BLE001 - a bug: one sentence to the client, the traceback in the console
        traceback.print_exc()
        first = (str(e).strip().splitlines() or ["no message"])[0]
        raise HTTPException(status_code=500, detail=f"Training could not start: {type(e).__name__}: {first}") from None
    names = [s.name for s in runner.waiting()]
    position = names.index(job.cfg.name) + 1 if job.cfg.name in names else 0
    return {**status_dict(job), "warnings": warnings, "queue_position": position}


def add_routes(app, host, *, credentials: Optional[Dict[str, str]] = None,
               roots: Optional[Callable[[], List[Path]]] = None, runner=None) -> None:
    """Adds the routes to `app`; guarded by HTTP Basic when credentials are given (the WebUI's --api-auth)."""
    deps = [Depends(make_auth(credentials))] if credentials else []
    roots = roots or host.allowed_roots
    the_runner = lambda: runner or jobs.RUNNER  # noqa: E731  (late: tests and reloads may swap jobs.RUNNER)

    async def train(request: Request):
        body = await read_json(request)  # bounded; the rest (folder checks, the job's start) off the event loop
        return await run_in_threadpool(start_job, body, host, roots(), the_runner())

    def status():
        return status_dict(the_runner().current)

    def cancel():
        return {"cancelled": the_runner().cancel()}

    def queue():
        return queue_dict(the_runner())

    def remove(name: str):
        return remove_queued(name, the_runner())

    def models():
        folders = {"checkpoint": host.checkpoint_dir(), "lora": host.lora_dir()}
        return {"models": trained_models(folders, _job_names(host, the_runner()))}

    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/cancel", cancel, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/queue", queue, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/queue/{{name}}", remove, methods=["DELETE"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/models", models, methods=["GET"], dependencies=deps)
