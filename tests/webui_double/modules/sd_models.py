import os

from modules import call_queue, paths, shared

model_dir = "Stable-diffusion"  # modules/sd_models.py: model_dir
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))  # sd_models.py: model_path (fixed at import)
checkpoints_list = {}  # sd_models.py: checkpoints_list, title -> CheckpointInfo
checkpoint_aliases = {}  # sd_models.py: checkpoint_aliases, every id -> CheckpointInfo
calls = []  # double only: the model-moving calls, for tests


class CheckpointInfo:
    """sd_models.py: CheckpointInfo(filename): filename, name, name_for_extra, model_name, title, ids."""

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
        self.title = self.name  # A1111 appends " [shorthash]" once the sha256 is cached
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.title, self.name, self.name_for_extra]

    def register(self):  # sd_models.py: CheckpointInfo.register()
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def checkpoint_tiles(use_short=False):  # sd_models.py: checkpoint_tiles(use_short=False)
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():  # sd_models.py: list_models(); modelloader.load_models scans model_path and --ckpt-dir
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    calls.append(("list_models",))
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            for f in sorted(files):
                if f.endswith((".ckpt", ".safetensors")) and not f.endswith((".vae.ckpt", ".vae.safetensors")):
                    CheckpointInfo(os.path.join(dirpath, f)).register()


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
