"""The host's folders: which ones a config may name, and the host's own applied to a config.

The tab and the API both start jobs from a dict of settings; `apply_host_folders` fills in where the
results go (the WebUI's --ckpt-dir and --lora-dir, its Settings > DreamBooth workspace folder), and
`check_paths` refuses any path setting outside the folders the host allows. Which settings are paths
comes from the config's own declarations (`setting(..., path=True)`), so a new one is checked too.
"""

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from dreambooth_ext.errors import UserError
from dreambooth_ext.paths import resolved, within_any
from dreambooth_ext.train.config import Concept, TrainConfig, declared

# the settings naming where results go, which the host fills from its own folders (the Host method of the same name)
HOST_FOLDERS = ("models_dir", "checkpoint_dir", "lora_dir")
OUTSIDE = ("is outside the WebUI's models folder, the extension's folder and the data folders in "
           "Settings > DreamBooth; move it there or add its folder")


def path_settings(cls=TrainConfig) -> List[str]:
    """Names of the settings of TrainConfig (or Concept) declared with path=True."""
    return declared("path", cls)


def apply_host_folders(data: Dict[str, Any], host) -> Dict[str, Any]:
    """A copy of a config dict with the host's folders wherever the config leaves them empty."""
    out = dict(data)
    for key in HOST_FOLDERS:
        folder = getattr(host, key)()
        if not out.get(key):
            out[key] = str(folder)
    root = host.workspace_root()
    name = out.get("name")
    if not out.get("workspace_dir") and root is not None and _plain_name(name):
        out["workspace_dir"] = str(Path(root) / name)
    return out


def _plain_name(name) -> bool:
    """A name that stays one folder below the workspace root; any other is refused later, by the name check."""
    return isinstance(name, str) and bool(name.strip()) and "/" not in name and "\\" not in name \
        and name not in (".", "..") and "\x00" not in name


def _found_paths(data: Dict[str, Any]) -> List[Tuple[str, Any]]:
    found = [(name, data.get(name)) for name in path_settings(TrainConfig)]
    concepts = data.get("concepts")
    for i, concept in enumerate(concepts if isinstance(concepts, list) else [], 1):
        if isinstance(concept, dict):
            found += [(f"{name} of concept {i}", concept.get(name)) for name in path_settings(Concept)]
    return found


def check_paths(data: Dict[str, Any], roots: List[Path], checkpoints: Iterable[str] = ()) -> None:
    """UserError naming the first path setting of a config dict that lies outside every allowed folder.

    `checkpoints`: files the WebUI itself lists (its --ckpt may lie elsewhere), allowed as the source model.
    """
    listed = {resolved(p) for p in checkpoints}
    for name, value in _found_paths(data):
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise UserError(f"Setting '{name}' must be a path string, not {type(value).__name__}.")
        if name == "checkpoint" and resolved(value) in listed:
            continue
        if not within_any(value, roots):
            raise UserError(f"Setting '{name}' ({value}) {OUTSIDE}.")


def settings_file(path: str, roots: List[Path], default: Optional[Path] = None) -> Path:
    """The settings file the tab may save to or load from: a .json name inside the allowed folders."""
    text = (path or "").strip()
    if not text:
        if default is None:
            raise UserError("Enter the path of a JSON settings file.")
        text = str(default)
    target = resolved(text)
    if target.suffix.lower() != ".json":
        raise UserError(f"Settings files end in .json; {text} does not, give a name like my_run.json.")
    if not within_any(target, roots):
        raise UserError(f"The settings file {text} {OUTSIDE}.")
    return target
