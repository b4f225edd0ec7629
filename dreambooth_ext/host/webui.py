"""The WebUI adapter: with webui_checkpoints.py, webui_progress.py and webui_class_images.py, the only
code that imports the host's `modules.*`.

One class serves A1111 v1.10.1, the Forge fork and SD.Next. The flavour is detected once and every
difference between them sits in these files, each beside the host file it follows. Imports of `modules.*` happen
inside methods, so importing this file never fails, even outside a WebUI.
"""

import importlib
import importlib.util
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

from dreambooth_ext.host.webui_checkpoints import WebUICheckpoints
from dreambooth_ext.host.webui_modules import A1111, FORGE, SDNEXT, _m, _say  # noqa: F401 - A1111: the flavours
from dreambooth_ext.host.webui_progress import WebUIProgress
from dreambooth_ext.hostapi import Host

T = TypeVar("T")

EXTENSION_DIR = Path(__file__).resolve().parents[2]
SECTION = ("dreambooth", "DreamBooth")

# key -> (default, label); shown in Settings > DreamBooth. Read with WebUIHost.option(key).
SETTINGS = {
    "dreambooth_workspace_dir": ("", "Folder for DreamBooth workspaces (class images, samples, resumable state); "
                                     "empty: models/dreambooth"),
    "dreambooth_data_dirs": ("", "Extra folders training may read and write, besides the models and extension "
                                 "folders (comma or newline separated)"),
    "dreambooth_unload_model": (True, "Move the WebUI's loaded checkpoint off the GPU while training"),
    "dreambooth_offer_activate": (True, "Offer to make a newly trained checkpoint the active one"),
}
# Settings a caller of the WebUI's own /sdapi/v1/options must not change: they widen what our API may touch.
API_RESTRICTED = {"dreambooth_data_dirs", "dreambooth_workspace_dir"}


def _has_module(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect_flavour() -> str:
    """Forge ships the `modules_forge` package beside `modules`; SD.Next moved its checkpoint list into
    `modules/sd_checkpoint.py`, which neither A1111 nor Forge has."""
    if _has_module("modules_forge"):
        return FORGE
    if _has_module("modules.sd_checkpoint"):
        return SDNEXT
    return A1111


def register_settings() -> None:
    """Adds the DreamBooth section to the WebUI's settings (called from on_ui_settings)."""
    shared = _m("shared")
    for key, (default, label) in SETTINGS.items():
        # SD.Next's OptionInfo takes **kwargs, so restrict_api is accepted there and ignored.
        info = shared.OptionInfo(default, label, section=SECTION, restrict_api=key in API_RESTRICTED)
        shared.opts.add_option(key, info)


class WebUIHost(WebUICheckpoints, WebUIProgress, Host):
    """The Host the tab and the API use inside a running WebUI (its checkpoints and its progress, live
    preview and top-bar buttons are in webui_checkpoints.py and webui_progress.py)."""

    def __init__(self, flavour: Optional[str] = None):
        self.flavour = flavour or detect_flavour()
        self.name = self.flavour
        self._progress_open = False

    # --- settings and folders

    def option(self, key: str, default=None):
        """A WebUI setting; SD.Next does not copy defaults into opts.data, so fall back to the declared one."""
        opts = _m("shared").opts
        fallback = SETTINGS[key][0] if key in SETTINGS and default is None else default
        try:
            return getattr(opts, key)
        except AttributeError:
            return fallback

    def clip_skip(self) -> Optional[int]:
        value = self.option("CLIP_stop_at_last_layers", 0)  # A1111 and Forge; SD.Next has none: 0
        try:
            return int(value) or None
        except (TypeError, ValueError):
            return None

    def models_dir(self) -> Path:
        # modules/paths_internal.py: models_path honours --models-dir and --data-dir (same name in SD.Next)
        return Path(_m("paths").models_path)

    def checkpoint_dir(self) -> Path:
        shared = _m("shared")
        if self.flavour == SDNEXT:  # SD.Next keeps folders in settings (modules/shared.py "ckpt_dir")
            folder = self.option("ckpt_dir", None)
        else:  # modules/cmd_args.py: --ckpt-dir, None when not given
            folder = getattr(shared.cmd_opts, "ckpt_dir", None)
        return Path(folder) if folder else self.models_dir() / "Stable-diffusion"

    def lora_dir(self) -> Path:
        shared = _m("shared")
        if self.flavour == SDNEXT:
            folder = self.option("lora_dir", None)
        else:  # extensions-builtin/Lora/preload.py adds --lora-dir (absent when that extension is disabled)
            folder = getattr(shared.cmd_opts, "lora_dir", None)
        return Path(folder) if folder else self.models_dir() / "Lora"

    def workspace_root(self) -> Optional[Path]:
        folder = str(self.option("dreambooth_workspace_dir") or "").strip()
        return Path(folder) if folder else None

    def data_dirs(self) -> List[Path]:
        text = str(self.option("dreambooth_data_dirs") or "")
        return [Path(p.strip()) for p in re.split(r"[,\n]", text) if p.strip()]

    def allowed_roots(self) -> List[Path]:
        """Folders the API may read and write: the WebUI's model folders, ours, and those set in Settings."""
        roots = [self.models_dir(), self.checkpoint_dir(), self.lora_dir(), EXTENSION_DIR]
        root = self.workspace_root()
        return roots + ([root] if root else []) + self.data_dirs()

    def non_local(self) -> bool:
        # A1111/Forge modules/shared_cmd_options.py: webui_is_non_local (--share, --listen, --ngrok, --server-name);
        # SD.Next has no such attribute, so the same flags are read one by one.
        cmd = _m("shared").cmd_opts
        known = getattr(cmd, "webui_is_non_local", None)
        if known is not None:
            return bool(known)
        return any(getattr(cmd, flag, None) for flag in ("share", "listen", "ngrok", "server_name"))

    # --- API switches

    def api_enabled(self) -> bool:
        # webui.py: --api adds the API to the UI, --nowebui serves only the API; SD.Next's --api defaults to True
        cmd = _m("shared").cmd_opts
        return bool(getattr(cmd, "api", False) or getattr(cmd, "nowebui", False) or getattr(cmd, "api_only", False))

    def api_credentials(self) -> Dict[str, str]:
        """user -> password the WebUI's own API accepts; empty when its API is open."""
        cmd = _m("shared").cmd_opts
        entries = []
        # modules/api/api.py: Api.__init__ reads --api-auth "u1:p1,u2:p2" (A1111, Forge)
        entries += str(getattr(cmd, "api_auth", None) or "").split(",")
        if self.flavour == SDNEXT:  # SD.Next's Api.__init__ reads --auth and --auth-file instead
            entries += str(getattr(cmd, "auth", None) or "").split(",")
            auth_file = getattr(cmd, "auth_file", None)
            if auth_file and os.path.isfile(auth_file):
                with open(auth_file, encoding="utf8") as f:
                    entries += f.read().splitlines()
        creds = {}
        for entry in entries:
            user, sep, password = entry.partition(":")
            if sep:
                creds[user.replace('"', "").strip()] = password.replace('"', "").strip()
        return creds

    # --- class images from the WebUI's own txt2img

    def refusal(self, cfg) -> Optional[str]:
        # SD.Next modules/sd_checkpoint.py list_models(): with its diffusers backend (shared.native) or the
        # sd_disable_ckpt setting it lists only .safetensors, so a .ckpt result would never show up.
        if self.flavour == SDNEXT and getattr(cfg, "save_format", "safetensors") == "ckpt":
            shared = _m("shared")
            if getattr(shared, "native", False) or self.option("sd_disable_ckpt", False):
                return ("Setting 'save_format' is 'ckpt', which SD.Next does not list with its diffusers backend "
                        "(.safetensors only); set it to 'safetensors'.")
        return None

    def cannot_make_class_images(self, cfg) -> Optional[str]:
        if self.flavour == SDNEXT:
            # SD.Next's modules/processing.py builds a diffusers pipeline from its own model loader; the
            # A1111 processing object this path drives is not what it runs.
            return ("Setting 'class_image_generator' is 'webui', which this extension does not support on "
                    "SD.Next (its txt2img runs through its own diffusers pipeline); set it to 'builtin'.")
        if self._info_for(cfg.checkpoint) is None and not _needs_no_class_images(cfg):
            return (f"Setting 'class_image_generator' is 'webui', but the WebUI does not list the base "
                    f"{Path(cfg.checkpoint).name} as a checkpoint; pick the base from the WebUI's checkpoint "
                    "list or set 'class_image_generator' to 'builtin'.")
        return None

    def make_class_images(self, cfg, job) -> int:
        from dreambooth_ext.host.webui_class_images import make_class_images

        return make_class_images(self, cfg, job)

    # --- the GPU

    def _queue_lock(self):
        # modules/call_queue.py: queue_lock (A1111/Forge: fifo_lock.FIFOLock, SD.Next: threading.Lock);
        # txt2img and img2img hold it while they run.
        try:
            return _m("call_queue").queue_lock
        except (ImportError, AttributeError):
            _say("the WebUI has no queue lock; training may run beside image generation")
            return _nolock()

    def run_exclusive(self, fn: Callable[[], T], before: Optional[Callable[[], None]] = None) -> T:
        with self._queue_lock():
            if before is not None:  # the WebUI's own txt2img (class images) needs its model where it is
                before()
            moved = self._offload() if self.option("dreambooth_unload_model") else None
            try:
                return fn()
            finally:
                self._restore(moved)

    def _offload(self):
        """Frees the GPU of the WebUI's model; returns what _restore needs to bring it back."""
        sd_models = _m("sd_models")
        if self.flavour == FORGE:
            # modules/sd_models.py (Forge): unload_model_weights() is backend.memory_management.unload_all_models()
            sd_models.unload_model_weights()
            return None
        model = getattr(sd_models.model_data, "sd_model", None)
        if model is None:
            return None
        if self.flavour == SDNEXT:
            sd_models.unload_model_weights(op="model")  # SD.Next drops the pipeline; it is reloaded after
        else:
            # A1111 ui_settings.py "Unload SD checkpoint to RAM": send_model_to_cpu, lowvram-aware
            sd_models.unload_model_weights(model)
        return model

    def _restore(self, model) -> None:
        """Never raises: the training's own result or error matters more than the reload."""
        if model is None:  # Forge moves its models back to the GPU by itself at the next generation
            return
        sd_models = _m("sd_models")
        try:
            if self.flavour == SDNEXT:
                sd_models.reload_model_weights()
            else:  # A1111 ui_settings.py "Load SD checkpoint to VRAM"
                sd_models.send_model_to_device(model)
        except Exception as e:
            _say(f"could not move the WebUI's checkpoint back to the GPU ({e}); reload it in Settings > Actions.")


def _needs_no_class_images(cfg) -> bool:
    from dreambooth_ext.train.class_images import class_jobs_from_config

    return not class_jobs_from_config(cfg)


@contextmanager
def _nolock() -> Iterator[None]:
    yield

