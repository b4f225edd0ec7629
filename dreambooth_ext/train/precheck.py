"""Everything that can be checked without loading the model, before any work.

The CLI, the job runner (so the tab and the API answer with the sentence instead of
"Training ...") and the trainer itself call `precheck(cfg)` (`prechecked(cfg)` gives the normalised
copy of the config as well): settings, the checkpoint and its family (from the file header), the
image folders, class folders that overlap them, the monitor's CLIP model folder, the name, a saved
state and its settings, files the run would replace, and a run that holds the name.
"""

import os
from pathlib import Path
from typing import List, Optional

from dreambooth_ext.errors import UserError
from dreambooth_ext.train import state as st
from dreambooth_ext.train.config import TrainConfig
from dreambooth_ext.train.config_checks import Checked, validate

# NAME_<step>.safetensors and the writer's `.NAME_<step>.safetensors.partial-<pid>` must fit in 255 bytes
NAME_LIMIT = 200


def precheck(cfg: TrainConfig) -> List[str]:
    """Warnings for a run that can start; UserError with one sentence for the first reason it cannot."""
    return prechecked(cfg).warnings


def prechecked(cfg: TrainConfig) -> Checked:
    """(the normalised copy of cfg, warnings) for a run that can start (see validate); UserError as precheck."""
    from dreambooth_ext.train.owned_files import check_no_clash
    from dreambooth_ext.train.workspace import secondary_process
    from dreambooth_ext.train.workspace_lock import check_free

    cfg, notes = validate(cfg)
    _check_name_length(cfg.name)
    _check_device_settings(cfg)
    fam = _checkpoint_family(cfg)
    if fam is not None:
        check_sizes(cfg, fam)
    for i, concept in enumerate(cfg.concepts, 1):
        _check_instance_folder(concept.instance_dir, i)
    _check_class_folders(cfg)
    notes += _check_monitor_clip(cfg)
    if not secondary_process():
        check_free(cfg.name, cfg.workspace_path())
    notes += _check_saved_state(cfg)
    check_no_clash(cfg)
    return Checked(cfg, notes)


def _check_monitor_clip(cfg) -> List[str]:
    """The monitor's CLIP folder, when one is set: a full CLIP model on disk (nothing is downloaded)."""
    from dreambooth_ext.train.monitor_clip import check_clip_folder

    if not cfg.monitor_clip_model.strip():
        return []
    check_clip_folder(cfg.monitor_clip_model)
    if not cfg.sample_every:
        return ["Setting 'monitor_clip_model' is set but sample_every is 0, so the monitor does not run and the "
                "CLIP model is not used; set sample_every to measure at the sample steps."]
    return []


def _check_name_length(name: str) -> None:
    size = len(name.encode("utf-8"))
    if size > NAME_LIMIT:
        raise UserError(f"Setting 'name' is {size} bytes long; keep it to {NAME_LIMIT} at most, so the file "
                        "names the run adds to it (NAME_<step>.safetensors) still fit.")


def _check_device_settings(cfg) -> None:
    from dreambooth_ext.train.optim import optimizer_available, refusal
    from dreambooth_ext.train.precision import check_attention, pick_device

    device = pick_device()
    check_attention(cfg.attention, device)
    usable, why = optimizer_available(cfg.optimizer, device)
    if not usable:
        raise UserError(refusal(cfg.optimizer, why))


def _checkpoint_family(cfg) -> Optional[dict]:
    """The model's family dict from its configs or its file header, without loading any weights."""
    from dreambooth_ext.bridge.detect import detect_family
    from dreambooth_ext.bridge.diffusers_folder import family_from_folder
    from dreambooth_ext.bridge.tensor_io import open_checkpoint, sniff_format
    from dreambooth_ext.bridge.to_diffusers import resolve_family

    src = Path(cfg.checkpoint).expanduser()
    if src.is_dir():
        if not (src / "model_index.json").is_file():
            raise UserError(f"{src} is a folder without model_index.json; give a .safetensors/.ckpt checkpoint "
                            "or a diffusers folder.")
        return family_from_folder(src)
    if not src.is_file():
        raise UserError(f"The checkpoint {src} does not exist; give the path of a .safetensors or .ckpt file.")
    if sniff_format(src) != "safetensors":
        return None  # a pickle is read whole: its family is found when it is converted
    source = open_checkpoint(src)
    return resolve_family(src, source, detect_family(source.shapes(), src.name), cfg.family)


def size_multiple(fam: dict) -> int:
    """Image sides must survive the VAE's and the UNet's downsampling without a remainder."""
    vae = 2 ** (len(fam["vae"]["block_out_channels"]) - 1)
    return vae * 2 ** (len(fam["unet"]["down_block_types"]) - 1)


def check_sizes(cfg, fam: dict) -> None:
    """Refuse a resolution or bucket step the family's downsampling (fam: its "vae" and "unet" configs) cannot take."""
    multiple = size_multiple(fam)
    if cfg.resolution % multiple:
        raise UserError(f"Setting 'resolution' is {cfg.resolution}; this model needs a multiple of {multiple} "
                        f"(e.g. {cfg.resolution // multiple * multiple or multiple}).")
    if cfg.bucketing and cfg.bucket_step % multiple:
        raise UserError(f"Setting 'bucket_step' is {cfg.bucket_step}; this model needs a multiple of {multiple}.")


def _check_instance_folder(folder: str, i: int) -> None:
    """At least one image decodes; the full scan (and its warnings) comes later, once."""
    from dreambooth_ext.train.images import IMAGE_SUFFIXES, BadImage, check_instance_folder, load_image

    path = Path(folder)
    if path.is_dir():
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise UserError(f"The instance image folder of concept {i} {path} cannot be read "
                            f"({e.strerror or e}); check its permissions.") from None
        for name in names:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                load_image(path / name)
                return
            except BadImage:
                continue
    # no usable image: the full check names the exact problem
    check_instance_folder(path, label=f"instance image folder of concept {i}", warn=lambda _w: None)


def _check_class_folders(cfg) -> None:
    """Class images written into a subject's own pictures would be trained as the subject."""
    from dreambooth_ext.paths import within
    from dreambooth_ext.train.class_images import class_jobs_from_config

    instances = [(i, Path(c.instance_dir).expanduser().resolve()) for i, c in enumerate(cfg.concepts, 1)]
    for job in class_jobs_from_config(cfg):
        klass = Path(job.folder).expanduser().resolve()
        for i, inst in instances:
            if within(klass, inst) or within(inst, klass):
                where = "is" if klass == inst else ("is inside" if within(klass, inst) else "contains")
                raise UserError(f"The class folder {job.folder} {where} the instance image folder of concept {i} "
                                f"({inst}); class images would be mixed with your own pictures: choose a "
                                "separate class folder (or leave it empty for one in the workspace).")


def _check_saved_state(cfg) -> List[str]:
    from dreambooth_ext.train.owned_files import read_record

    saved = st.read_progress(cfg.workspace_path())
    if saved is None:
        if read_record(cfg):
            return [f"No saved state of '{cfg.name}' is in {st.state_dir(cfg.workspace_path())} although this "
                    "name has trained before (a finished run keeps its state only with 'save_state_every'); "
                    "training starts from step 0."]
        return []
    if saved.step == 0:
        return []
    st.check_same_settings(cfg, saved, cfg.workspace_path())
    return []
