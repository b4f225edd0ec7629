import argparse
import json
import os
import time

from modules import paths

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


# modules/shared_options.py: options_templates (only sd_model_checkpoint)
opts = Options({"sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint")})


class State:
    """modules/shared_state.py: State (the fields the progress bar reads, begin/end/interrupt)."""

    skipped = interrupted = stopping_generation = False
    job, job_no, job_count, job_timestamp = "", 0, 0, "0"
    sampling_step = sampling_steps = 0
    textinfo = None
    time_start = None

    def begin(self, job: str = "(unknown)"):  # shared_state.py: State.begin(job="(unknown)")
        self.sampling_step, self.time_start, self.job_count, self.job_no = 0, time.time(), -1, 0
        self.skipped = self.interrupted = self.stopping_generation = False
        self.textinfo, self.job = None, job

    def end(self):  # shared_state.py: State.end(); reads time_start, which only begin() sets
        time.time() - self.time_start  # A1111 logs the duration: TypeError when begin() never ran
        self.job, self.job_count = "", 0

    def interrupt(self):  # shared_state.py: State.interrupt()
        self.interrupted = True


state = State()  # modules/shared.py: state (set by shared_init.initialize)
