"""The WebUI adapter: the one module that imports the host's `modules.*`.

One class serves A1111 v1.10.1, the Forge fork and SD.Next. The flavour is detected once and every
difference between them sits here, each beside the host file it follows. Imports of `modules.*` happen
inside methods, so importing this file never fails, even outside a WebUI.
"""

import importlib
import importlib.util
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

from dreambooth_ext.errors import UserError
from dreambooth_ext.hostapi import Host

T = TypeVar("T")

A1111, FORGE, SDNEXT = "a1111", "forge", "sdnext"
_CHECKSUM = re.compile(r" \[[0-9a-fA-F]{8,64}\]$")  # the " [hash]" a title gains once the file is hashed
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


def _m(name: str):
    return importlib.import_module(f"modules.{name}")


def _say(text: str) -> None:
    print(f"[dreambooth] {text}", file=sys.stderr)


def register_settings() -> None:
    """Adds the DreamBooth section to the WebUI's settings (called from on_ui_settings)."""
    shared = _m("shared")
    for key, (default, label) in SETTINGS.items():
        # SD.Next's OptionInfo takes **kwargs, so restrict_api is accepted there and ignored.
        info = shared.OptionInfo(default, label, section=SECTION, restrict_api=key in API_RESTRICTED)
        shared.opts.add_option(key, info)


class WebUIHost(Host):
    """The Host the tab and the API use inside a running WebUI."""

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

    # --- checkpoints

    def _checkpoint_module(self):
        # SD.Next's modules/sd_checkpoint.py list_models() rebinds its module-level checkpoints_list to a new
        # sorted dict each time; modules/sd_models.py imported the first dict by name, which is never updated
        # again (a file written later is missing there; SD.Next's own /sdapi/v1/sd-models reads that stale one).
        # Its checkpoint_aliases lives only in sd_checkpoint. A1111 and Forge keep both in sd_models.
        return _m("sd_checkpoint") if self.flavour == SDNEXT else _m("sd_models")

    def _checkpoints(self) -> list:
        return list(self._checkpoint_module().checkpoints_list.values())

    def list_checkpoints(self) -> List[Tuple[str, str]]:
        # modules/sd_models.py: checkpoints_list maps title -> CheckpointInfo (SD.Next: modules/sd_checkpoint.py)
        return [(info.title, info.filename) for info in self._checkpoints()]

    def checkpoint_file(self, title: str) -> Optional[str]:
        # modules/sd_models.py: checkpoint_aliases maps every id of a checkpoint to its CheckpointInfo, the title
        # it had before its first load and the ' [hash]' one it gains then (CheckpointInfo.calculate_shorthash);
        # get_closet_checkpoint_match strips a trailing ' [hash]' (re_strip_checksum) the same way. Its
        # substring match is left out: 'dog' must not name 'hotdog_800.safetensors'.
        aliases = getattr(self._checkpoint_module(), "checkpoint_aliases", None) or {}
        for key in (title, _CHECKSUM.sub("", title)):
            info = aliases.get(key)
            if info is not None:
                return info.filename
        return super().checkpoint_file(title)

    def refresh_checkpoints(self) -> None:
        # A generation waiting for the queue lock must never run while list_models() has emptied the list
        # (it fails with "No checkpoints found", or falls back to another model).
        with self._queue_lock():
            self.refresh_checkpoints_locked()

    def refresh_checkpoints_locked(self) -> None:
        # modules/shared_items.py: refresh_checkpoints() is sd_models.list_models() in all three hosts;
        # list_models() clears checkpoints_list and checkpoint_aliases, then scans the folders again.
        _m("sd_models").list_models()

    def active_checkpoint(self) -> Optional[str]:
        sd_models, shared = _m("sd_models"), _m("shared")
        # model_data.sd_model, not shared.sd_model: A1111's shared.sd_model loads a model when none is loaded.
        # Forge starts with a FakeInitialModel that has no sd_checkpoint_info.
        model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        info = getattr(model, "sd_checkpoint_info", None)
        if info is None:
            title = shared.opts.data.get("sd_model_checkpoint")
            info = getattr(self._checkpoint_module(), "checkpoint_aliases", {}).get(title) if title else None
        if info is None:
            try:  # A1111 raises FileNotFoundError without checkpoints; Forge and SD.Next return None
                info = sd_models.select_checkpoint()
            except Exception:
                info = None
        return getattr(info, "filename", None)

    def _info_for(self, path: str):
        want = os.path.normcase(os.path.abspath(path))
        for info in self._checkpoints():
            if os.path.normcase(os.path.abspath(info.filename)) == want:
                return info
        return None

    def _is_loaded(self, info) -> bool:
        model = getattr(getattr(_m("sd_models"), "model_data", None), "sd_model", None)
        loaded = getattr(getattr(model, "sd_checkpoint_info", None), "filename", None)
        return loaded is not None and os.path.normcase(os.path.abspath(loaded)) == \
            os.path.normcase(os.path.abspath(info.filename))

    def set_active_checkpoint(self, path: str) -> bool:
        info = self._info_for(path)
        if info is None:
            self.refresh_checkpoints()
            info = self._info_for(path)
        if info is None:
            return False
        shared = _m("shared")
        if self.flavour == FORGE:
            # modules_forge/main_entry.py: checkpoint_change() sets the option and Forge's loading parameters;
            # Forge loads the model at the next generation (its sd_models.load_model is a stub).
            importlib.import_module("modules_forge.main_entry").checkpoint_change(info.title)
            return True
        # A1111 initialize_util.py / SD.Next webui.py: the option's onchange reloads the weights under the queue
        # lock. modules/options.py Options.set returns False both when the value is unchanged and when onchange
        # failed (it shows the error in the console and puts the old value back).
        if not shared.opts.set("sd_model_checkpoint", info.title):
            if shared.opts.data.get("sd_model_checkpoint") != info.title:
                raise UserError(f"The WebUI could not load {Path(info.filename).name} (its console says why); "
                                "pick it in the checkpoint list at the top of the page to try again.")
            try:
                with self._queue_lock():  # already selected: make sure it is the loaded one
                    _m("sd_models").reload_model_weights(info=info)
            except Exception as e:  # noqa: BLE001 - the WebUI's own loading failed
                raise UserError(f"The WebUI could not load {Path(info.filename).name} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}).") from None
        if self.flavour == SDNEXT and not self._is_loaded(info):
            # SD.Next modules/sd_models.py load_diffuser() logs 'Load model: name="..." not loaded' and returns
            # when diffusers refuses the file: nothing is raised, Options.set returns True, the option keeps the
            # new title and no model is loaded (the previous one was unloaded first).
            raise UserError(f"SD.Next could not load {Path(info.filename).name} (its console says why); pick "
                            "another checkpoint in the list at the top of the page.")
        try:
            shared.opts.save(shared.config_filename)
        except Exception as e:  # the checkpoint is active; only remembering it across restarts failed
            _say(f"could not save the settings file: {e}")
        return True

    # --- progress (modules/shared_state.py: State)

    def progress_begin(self, title: str, total: int) -> None:
        state = _m("shared").state
        # positional: A1111/Forge name it begin(job=...), SD.Next begin(title=..., api=None)
        state.begin(f"dreambooth: {title}")
        self._progress_open = True
        # modules/progress.py: progress = job_no/job_count + sampling_step/sampling_steps/job_count
        state.job_count, state.job_no = 1, 0
        state.sampling_steps, state.sampling_step = max(int(total), 1), 0
        state.textinfo = f"Training {title}"

    def progress_update(self, step: int, total: int, text: str) -> None:
        state = _m("shared").state
        state.sampling_steps, state.sampling_step = max(int(total), 1), int(step)
        state.textinfo = text

    def progress_end(self) -> None:
        if self._progress_open:  # State.end() reads time_start, which only begin() sets
            self._progress_open = False
            state = _m("shared").state
            state.textinfo = None  # the progress API would go on showing the last step's text
            state.end()

    def interrupted(self) -> bool:
        return bool(getattr(_m("shared").state, "interrupted", False))

    def skipped(self) -> bool:
        # shared_state.py: State.skip() (the top bar's Skip, /sdapi/v1/skip) sets `skipped`; begin() clears it
        return bool(getattr(_m("shared").state, "skipped", False))

    def clear_skip(self) -> None:
        _m("shared").state.skipped = False  # processing.py clears it the same way before its next image

    def preview(self, image_path: str) -> None:
        """shared_state.py: assign_current_image() sets current_image and bumps id_live_preview, which the
        progress API (modules/progress.py) sends as the live preview; its do_set_current_image() leaves the
        image alone while current_latent is None, as it is during training."""
        try:
            from PIL import Image

            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except OSError:  # a sample removed meanwhile: no preview, no error
            return
        state = _m("shared").state
        assign = getattr(state, "assign_current_image", None)
        if assign is not None:
            assign(image)
        else:  # older or other hosts: the same two fields by hand
            state.current_image = image
            state.id_live_preview = getattr(state, "id_live_preview", 0) + 1

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

