import hashlib
import os
import re

from modules import call_queue, paths, shared

model_dir = "Stable-diffusion"  # modules/sd_models.py: model_dir
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))  # sd_models.py: model_path (fixed at import)
checkpoints_list = {}  # sd_models.py: checkpoints_list, title -> CheckpointInfo
checkpoint_aliases = {}  # sd_models.py: checkpoint_aliases, every id -> CheckpointInfo
calls = []  # double only: the model-moving calls, for tests


sha256_cache = {}  # double only: hashes.sha256_from_cache's cache.json, filename -> sha256
between_clear_and_refill = None  # double only: called while list_models() has emptied the list (tests widen it)


def _sha256(filename):  # modules/hashes.py: sha256(filename, title) computes once, then reads the cache
    if filename not in sha256_cache:
        with open(filename, "rb") as f:
            sha256_cache[filename] = hashlib.sha256(f.read()).hexdigest()
    return sha256_cache[filename]


class CheckpointInfo:
    """sd_models.py: CheckpointInfo(filename): filename, name, name_for_extra, model_name, title, ids.

    The title is the name alone until the file's sha256 is known; its first load (calculate_shorthash)
    makes it 'NAME [shorthash]', and every later list_models() finds the hash in the cache."""

    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        if ckpt_dir and abspath.startswith(ckpt_dir):
            name = abspath.replace(ckpt_dir, '')
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, '')
        else:
            name = os.path.basename(filename)
        self.name = name.lstrip("\\/")
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]
        self.sha256 = sha256_cache.get(filename)  # hashes.sha256_from_cache()
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = self.name if self.shorthash is None else f"{self.name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else \
            f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.model_name, self.title, self.name, self.name_for_extra]
        if self.shorthash:
            self.ids += self._hash_ids()

    def _hash_ids(self):
        return [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):  # sd_models.py: CheckpointInfo.register()
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):  # sd_models.py: CheckpointInfo.calculate_shorthash(), run by every load
        self.sha256 = _sha256(self.filename)
        if self.shorthash == self.sha256[0:10]:
            return self.shorthash
        self.shorthash = self.sha256[0:10]
        if self.shorthash not in self.ids:
            self.ids += self._hash_ids()
        old_title, self.title = self.title, f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        # sd_models.py: replace_key() renames the entry in place, keeping the list's order
        items = [(self.title if k == old_title else k, v) for k, v in checkpoints_list.items()]
        checkpoints_list.clear()
        checkpoints_list.update(items)
        self.register()
        return self.shorthash


def checkpoint_tiles(use_short=False):  # sd_models.py: checkpoint_tiles(use_short=False)
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():
    """sd_models.py: list_models() empties checkpoints_list and checkpoint_aliases, then scans model_path and
    --ckpt-dir (modelloader.load_models) and registers each file again: in between, the list is empty."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    calls.append(("list_models",))
    if between_clear_and_refill is not None:
        between_clear_and_refill()
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            for f in sorted(files):
                if f.endswith((".ckpt", ".safetensors")) and not f.endswith((".vae.ckpt", ".vae.safetensors")):
                    CheckpointInfo(os.path.join(dirpath, f)).register()


def get_closet_checkpoint_match(search_string):
    """sd_models.py: get_closet_checkpoint_match(): an alias, else the shortest title containing the string,
    else the same with a trailing ' [hash]' taken off."""
    if not search_string:
        return None
    if search_string in checkpoint_aliases:
        return checkpoint_aliases[search_string]
    for wanted in (search_string, re.sub(r"\s*\[[^]]+]\s*$", "", search_string)):
        found = sorted((i for i in checkpoints_list.values() if wanted in i.title), key=lambda i: len(i.title))
        if found:
            return found[0]
    return None


def select_checkpoint():  # sd_models.py: select_checkpoint(); raises FileNotFoundError without checkpoints
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint, None)
    if info is not None:
        return info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found.")
    return next(iter(checkpoints_list.values()))


class FakeModel:
    """Stands for a loaded LatentDiffusion: where it lives, which checkpoint it is, lowvram flag."""

    def __init__(self, info, device="cuda"):
        self.sd_checkpoint_info, self.sd_model_checkpoint, self.device, self.lowvram = info, info.filename, device, False


class SdModelData:  # sd_models.py: SdModelData (sd_model, loaded_sd_models, get_sd_model, set_sd_model)
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False

    def get_sd_model(self):
        if self.sd_model is None and not self.was_loaded_at_least_once:
            load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v


model_data = SdModelData()  # sd_models.py: model_data


def send_model_to_cpu(m):  # sd_models.py: send_model_to_cpu(m)
    calls.append(("send_model_to_cpu", m))
    if m is not None:
        m.device = "cpu"


def send_model_to_device(m):  # sd_models.py: send_model_to_device(m)
    calls.append(("send_model_to_device", m))
    m.device = "cuda"


def load_model(checkpoint_info=None, already_loaded_state_dict=None):  # sd_models.py: load_model()
    checkpoint_info = checkpoint_info or select_checkpoint()
    calls.append(("load_model", checkpoint_info.filename))
    # sd_models.py: load_model_weights() hashes the file (the title gains ' [hash]') and records the title
    checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    model_data.set_sd_model(FakeModel(checkpoint_info))
    model_data.was_loaded_at_least_once = True
    return model_data.sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):  # sd_models.py: reload_model_weights()
    checkpoint_info = info or select_checkpoint()
    sd_model = sd_model or model_data.sd_model
    calls.append(("reload_model_weights", checkpoint_info.filename))
    if sd_model is not None and sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model
    return load_model(checkpoint_info)


def unload_model_weights(sd_model=None, info=None):  # sd_models.py: unload_model_weights() moves it to RAM
    send_model_to_cpu(sd_model or model_data.get_sd_model())  # A1111: shared.sd_model, i.e. get_sd_model()
    return sd_model


def _reload_queued():  # initialize_util.py: wrap_queued_call(lambda: sd_models.reload_model_weights())
    with call_queue.queue_lock:
        reload_model_weights()


# modules/initialize_util.py: changing the checkpoint setting reloads the weights
shared.opts.onchange("sd_model_checkpoint", _reload_queued, call=False)
