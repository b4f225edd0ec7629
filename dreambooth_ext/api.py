"""HTTP routes under /dreambooth/v1/: start a training job, read its progress, cancel it, list trained models.

Added to the WebUI's FastAPI app by the adapter when the WebUI runs with --api, behind the same HTTP
Basic credentials as the WebUI's own API. Bodies are plain dicts, so the routes work with pydantic 1
(A1111's fastapi 0.94) and pydantic 2 (Forge's fastapi 0.104) alike. Every path in a posted config
must lie inside a folder the host allows (`roots()`); nothing else is read or written.
"""

import json
import os
import re
from pathlib import Path
from secrets import compare_digest
from typing import Callable, Dict, Iterable, List, Optional

from fastapi import Body, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from dreambooth_ext import jobs
from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import load_config
from dreambooth_ext.train.config_checks import validate

PREFIX = "/dreambooth/v1"
PATH_FIELDS = ("checkpoint", "models_dir", "workspace_dir", "init_lora")
CONCEPT_PATH_FIELDS = ("instance_dir", "class_dir")
MODEL_SUFFIXES = (".safetensors", ".ckpt")


def make_auth(credentials: Dict[str, str]):
    """The dependency A1111's modules/api/api.py uses (Api.auth): HTTP Basic against --api-auth."""

    def auth(creds: HTTPBasicCredentials = Depends(HTTPBasic())):
        password = credentials.get(creds.username)
        if password is not None and compare_digest(creds.password.encode(), password.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return auth


# --- path safety


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    target = path.resolve()  # follows symlinks and '..', so neither can lead out
    return any(target == r or r in target.parents for r in roots)


def check_paths(body: dict, roots: List[Path], checkpoints: Iterable[str] = ()) -> None:
    """Raises UserError naming the first path of the config that lies outside every allowed folder.

    `checkpoints`: files the WebUI itself lists (its --ckpt may lie elsewhere); allowed as the source model.
    """
    resolved = [Path(r).resolve() for r in roots]
    listed = {Path(p).resolve() for p in checkpoints}
    found = [(name, body.get(name)) for name in PATH_FIELDS]
    for i, concept in enumerate(body.get("concepts") or [], 1):
        if isinstance(concept, dict):
            found += [(f"{name} of concept {i}", concept.get(name)) for name in CONCEPT_PATH_FIELDS]
    for name, value in found:
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise UserError(f"Setting '{name}' must be a path string, not {type(value).__name__}.")
        if name == "checkpoint" and Path(value).resolve() in listed:
            continue
        if not _inside(Path(value), resolved):
            raise UserError(f"Setting '{name}' ({value}) is outside the WebUI's models folder, the extension's "
                            "folder and the data folders in Settings > DreamBooth; move it there or add its folder.")


def prepare_config(body: dict, host, roots: List[Path]):
    """The TrainConfig for a posted body: host defaults filled in, paths checked, settings validated."""
    if not isinstance(body, dict):
        raise UserError("The request body must be a JSON object with the training settings.")
    body = dict(body)
    if not body.get("models_dir"):  # results go where the WebUI looks, not to TrainConfig's relative default
        body["models_dir"] = str(host.models_dir())
    workspace_root = getattr(host, "workspace_root", lambda: None)()
    if not body.get("workspace_dir") and workspace_root and isinstance(body.get("name"), str):
        body["workspace_dir"] = str(workspace_root / body["name"])
    titles = dict(host.list_checkpoints())  # a checkpoint may be named by its dropdown title
    if isinstance(body.get("checkpoint"), str) and body["checkpoint"] in titles:
        body["checkpoint"] = titles[body["checkpoint"]]
    check_paths(body, roots, titles.values())
    cfg = load_config(body)
    return cfg, validate(cfg)


# --- trained models


def read_safetensors_metadata(path) -> Dict[str, str]:
    """The `__metadata__` of a .safetensors header (8-byte length, then JSON); {} when unreadable."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _job_names(models_dir: Path, runner) -> List[str]:
    names = []
    workspaces = models_dir / "dreambooth"
    if workspaces.is_dir():
        names = [p.name for p in workspaces.iterdir() if p.is_dir()]
    if runner.current is not None:
        names.append(runner.current.cfg.name)
    return names


def trained_models(folders: Dict[str, Path], job_names: List[str]) -> List[dict]:
    """Files with our metadata, or named NAME_<step> after a known job (a .ckpt has no metadata)."""
    pattern = re.compile("^(" + "|".join(re.escape(n) for n in job_names) + r")_\d+$") if job_names else None
    found, seen = [], set()
    for kind, folder in folders.items():
        for dirpath, _dirs, files in os.walk(folder):
            for fname in sorted(files):
                path = Path(dirpath) / fname
                if path.suffix.lower() not in MODEL_SUFFIXES or path.resolve() in seen:
                    continue
                meta = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
                if "dreambooth_ext.steps" not in meta and not (pattern and pattern.match(path.stem)):
                    continue
                seen.add(path.resolve())
                found.append({"name": path.stem, "kind": kind, "path": str(path), "size": path.stat().st_size,
                              "steps": int(meta["dreambooth_ext.steps"]) if meta.get("dreambooth_ext.steps", "").isdigit() else None,
                              "base_checkpoint": meta.get("dreambooth_ext.base_checkpoint")})
    return found


# --- routes


def status_dict(job) -> dict:
    if job is None:
        return {"status": "idle"}
    s = job.snapshot()
    return {"name": s.name, "status": s.status, "stage": s.stage, "step": s.step, "total": s.total,
            "loss": s.loss, "lr": s.lr, "eta": s.eta_seconds, "samples": s.samples, "outputs": s.outputs,
            "warnings": s.warnings, "error": s.error}


def add_routes(app, host, *, credentials: Optional[Dict[str, str]] = None,
               roots: Optional[Callable[[], List[Path]]] = None, runner=None) -> None:
    """Adds the routes to `app`; guarded by HTTP Basic when credentials are given (the WebUI's --api-auth)."""
    deps = [Depends(make_auth(credentials))] if credentials else []
    roots = roots or host.allowed_roots
    the_runner = lambda: runner or jobs.RUNNER  # noqa: E731  (late: tests and reloads may swap jobs.RUNNER)

    def train(body: dict = Body(...)):
        try:
            cfg, warnings = prepare_config(body, host, roots())
        except UserError as e:
            raise HTTPException(status_code=400, detail=str(e))
        try:
            on_event, around = jobs.host_hooks(host, cfg.name, cfg.max_steps)
            job = the_runner().start(cfg, on_event=on_event, around=around)
        except UserError as e:  # one job at a time
            raise HTTPException(status_code=409, detail=str(e))
        return {**status_dict(job), "warnings": warnings}

    def status():
        return status_dict(the_runner().current)

    def cancel():
        return {"cancelled": the_runner().cancel()}

    def models():
        runner_now = the_runner()
        folders = {"checkpoint": host.checkpoint_dir(), "lora": host.lora_dir()}
        return {"models": trained_models(folders, _job_names(host.models_dir(), runner_now))}

    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/cancel", cancel, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/models", models, methods=["GET"], dependencies=deps)
