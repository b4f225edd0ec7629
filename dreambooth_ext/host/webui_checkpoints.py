"""The WebUI adapter's view of the host's checkpoint list: listing, naming, refreshing, the active one."""

import importlib
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from dreambooth_ext.errors import UserError
from dreambooth_ext.host.webui_modules import FORGE, SDNEXT, _m, _say

_CHECKSUM = re.compile(r" \[[0-9a-fA-F]{8,64}\]$")  # the " [hash]" a title gains once the file is hashed


class WebUICheckpoints:
    """Checkpoint methods of WebUIHost (it supplies `flavour` and `_queue_lock`)."""

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
