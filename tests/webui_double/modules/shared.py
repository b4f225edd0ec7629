import argparse
import json
import os
import time

from modules import paths, shared_total_tqdm

# modules/cmd_args.py (+ extensions-builtin/Lora/preload.py for lora_dir): the flags the extension reads
cmd_opts = argparse.Namespace(
    api=False, api_auth=None, nowebui=False, ckpt_dir=None, ckpt=None, no_download_sd_model=True,
    lora_dir=os.path.join(paths.models_path, "Lora"), ui_settings_file=os.path.join(paths.data_path, "config.json"),
    freeze_settings=False, share=False, listen=False, ngrok=None, server_name=None,
)
# modules/shared_cmd_options.py: set once the flags are parsed
cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
config_filename = cmd_opts.ui_settings_file  # modules/shared.py: config_filename


shown_errors = []  # double only: what errors.display() would print to the console


class OptionInfo:
    """modules/options.py: OptionInfo (re-exported as shared.OptionInfo)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.refresh, self.category_id = onchange, section, refresh, category_id
        self.comment_before, self.comment_after, self.infotext = comment_before, comment_after, infotext
        self.restrict_api = restrict_api
        self.do_not_save = False


class Options:
    """modules/options.py: Options (data, data_labels, set, add_option, onchange, save)."""

    def __init__(self, data_labels):
        object.__setattr__(self, "data_labels", data_labels)
        object.__setattr__(self, "data", {k: v.default for k, v in data_labels.items()})

    def __getattr__(self, item):  # options.py: Options.__getattr__
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):  # options.py: Options.__setattr__ (no freezing rules here)
        if key in self.data or key in self.data_labels:
            self.data[key] = value
            return
        object.__setattr__(self, key, value)

    def set(self, key, value, is_api=False, run_callbacks=True):
        """options.py: Options.set(): False when unchanged, not saved, API-restricted, or when onchange fails;
        a failing onchange is shown in the console (errors.display), the old value put back, nothing raised."""
        oldval = self.data.get(key, None)
        if oldval == value:
            return False
        option = self.data_labels[key]
        if option.do_not_save:
            return False
        if is_api and option.restrict_api:
            return False
        try:
            setattr(self, key, value)
        except RuntimeError:
            return False
        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception as e:
                shown_errors.append((key, value, e))
                setattr(self, key, oldval)
                return False
        return True

    def add_option(self, key, info):  # options.py: Options.add_option()
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def onchange(self, key, func, call=True):  # options.py: Options.onchange()
        self.data_labels[key].onchange = func
        if call:
            func()

    def save(self, filename):  # options.py: Options.save()
        with open(filename, "w", encoding="utf8") as file:
            json.dump(self.data, file, indent=4)


# modules/shared_options.py: options_templates (only those the extension or the double reads)
opts = Options({
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
    "live_previews_image_format": OptionInfo("png", "Live preview file format"),
    "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
})


class State:
    """modules/shared_state.py: State (the fields the progress bar and live preview read, begin/end,
    interrupt/skip as /sdapi/v1/interrupt and /sdapi/v1/skip call them, nextjob, assign_current_image)."""

    skipped = interrupted = stopping_generation = False
    job, job_no, job_count, job_timestamp = "", 0, 0, "0"
    sampling_step = sampling_steps = 0
    current_latent = current_image = None
    current_image_sampling_step = id_live_preview = 0
    textinfo = None
    time_start = None

    def begin(self, job: str = "(unknown)"):  # shared_state.py: State.begin(job="(unknown)")
        self.sampling_step, self.time_start, self.job_count, self.job_no = 0, time.time(), -1, 0
        self.current_latent = self.current_image = None
        self.current_image_sampling_step = self.id_live_preview = 0
        self.skipped = self.interrupted = self.stopping_generation = False
        self.textinfo, self.job = None, job

    def skip(self):  # shared_state.py: State.skip(), what /sdapi/v1/skip and the Skip button call
        self.skipped = True

    def nextjob(self):  # shared_state.py: State.nextjob() (live preview refresh left out)
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def set_current_image(self):  # shared_state.py: set_current_image() -> do_set_current_image()
        if self.sampling_step - self.current_image_sampling_step >= opts.show_progress_every_n_steps and \
                opts.live_previews_enable and opts.show_progress_every_n_steps != -1:
            self.do_set_current_image()

    def do_set_current_image(self):  # shared_state.py: nothing to decode without a latent
        if self.current_latent is None:
            return

    def assign_current_image(self, image):  # shared_state.py: State.assign_current_image(image)
        if opts.live_previews_image_format == 'jpeg' and image.mode == 'RGBA':
            image = image.convert('RGB')
        self.current_image = image
        self.id_live_preview += 1

    def end(self):  # shared_state.py: State.end(); reads time_start, which only begin() sets
        time.time() - self.time_start  # A1111 logs the duration: TypeError when begin() never ran
        self.job, self.job_count = "", 0

    def interrupt(self):  # shared_state.py: State.interrupt()
        self.interrupted = True


state = State()  # modules/shared.py: state (set by shared_init.initialize)
total_tqdm = shared_total_tqdm.TotalTQDM()  # modules/shared.py: total_tqdm (set by shared_init.initialize)
