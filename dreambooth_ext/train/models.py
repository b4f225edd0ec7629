"""The base model a run trains: converted once from the WebUI checkpoint, then loaded as modules."""

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from dreambooth_ext.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """Every module of one pipeline, plus what the trainer needs to know about it."""

    folder: Path  # the diffusers folder the modules came from
    family: str  # sd1 | sd2 | sd2-v | sdxl
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: List[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object  # a DDPMScheduler with the model's betas and prediction type
    scheduler_config: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def _source_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def _read_marker(marker: Path):
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # missing, or cut short by a kill: convert again


def prepare_base(checkpoint: str, workspace: Path, family: str = "auto",
                 progress: Optional[Callable[[str], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> Path:
    """A diffusers folder for `checkpoint`: the folder itself, or a conversion cached in the workspace."""
    from dreambooth_ext.bridge import single_file_to_diffusers

    src = Path(checkpoint).expanduser()
    if src.is_dir():
        if not (src / "model_index.json").is_file():
            raise UserError(f"{src} is a folder without model_index.json; give a .safetensors/.ckpt checkpoint or a diffusers folder.")
        return src
    if not src.is_file():
        raise UserError(f"The checkpoint {src} does not exist; give the path of a .safetensors or .ckpt file.")
    base = Path(workspace) / "base"
    marker = base / "source.json"
    key = {**_source_key(src), "family": family}
    if _read_marker(marker) == key and (base / "model" / "model_index.json").is_file():
        return base / "model"
    base.mkdir(parents=True, exist_ok=True)
    if _reuse_conversion(key, base, progress or log.info):
        return base / "model"
    report = single_file_to_diffusers(src, base / "model", family=family, overwrite=True, progress=progress,
                                      should_stop=should_stop)
    for note in report.notes:
        (progress or log.info)(f"note: {note}")
    marker.write_text(json.dumps(key))
    return base / "model"


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # the same bytes, no second copy: a conversion is never written over in place
    except OSError:
        shutil.copy2(src, dst)  # another file system, or links not allowed


def _reuse_conversion(key: dict, base: Path, say: Callable[[str], None]) -> bool:
    """Take another run's conversion of the same checkpoint (a sibling workspace) instead of converting again."""
    from dreambooth_ext.atomic import atomic_path

    for other in sorted(base.parent.parent.glob("*/base/source.json")):
        folder = other.parent / "model"
        if other.parent == base or _read_marker(other) != key or not (folder / "model_index.json").is_file():
            continue
        try:
            with atomic_path(base / "model") as tmp:
                shutil.copytree(folder, tmp, copy_function=_link_or_copy)
        except (OSError, UserError):
            continue  # that one is unusable (being replaced, unreadable): try another, or convert
        (base / "source.json").write_text(json.dumps(key))
        say(f"using the conversion of {Path(key['path']).name} made for {other.parent.parent.name}")
        return True
    return False


def load_bundle(folder: Path, torch_dtype: torch.dtype = torch.float32,
                dtypes: Optional[Dict[str, torch.dtype]] = None) -> ModelBundle:
    """Load every module of a diffusers folder, text encoders through the bridge's key check.

    `dtypes` ("unet", "vae", "text_encoder" -> dtype, from the run's placement) overrides `torch_dtype`
    per module, so frozen modules never take fp32 memory on their way to half precision.
    """
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreambooth_ext.bridge.components import TEXT_ENCODER, encoder_suffix, text_encoder_name
    from dreambooth_ext.bridge.diffusers_folder import component_state_dict, family_from_folder
    from dreambooth_ext.bridge.keymap_text import DERIVED_BUFFERS

    folder = Path(folder)
    fam = family_from_folder(folder)
    dtypes = {k: (dtypes or {}).get(k, torch_dtype) for k in ("unet", "vae", TEXT_ENCODER)}
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtypes["unet"],
                                                local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtypes["vae"], local_files_only=True)
    text_encoders, tokenizers = [], []
    for i, te in enumerate(fam["text_encoders"]):
        model = getattr(transformers, te["class"])(transformers.CLIPTextConfig(**te["config"])).to(dtypes[TEXT_ENCODER])
        state = component_state_dict(folder, text_encoder_name(i))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in DERIVED_BUFFERS]
        unexpected = [k for k in unexpected if k not in DERIVED_BUFFERS]
        if missing or unexpected:
            raise UserError(f"{text_encoder_name(i)} in {folder} does not fit its config: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}.")
        text_encoders.append(model)
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(str(folder / f"tokenizer{encoder_suffix(i)}")))
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
    for m in [unet, vae] + text_encoders:
        m.requires_grad_(False)
        m.eval()
    return ModelBundle(folder, fam["family"], unet, vae, text_encoders, tokenizers, scheduler,
                       json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))


def make_pipeline(bundle: ModelBundle, unet=None, text_encoders=None):
    """An inference pipeline over the bundle's modules (or trained replacements), sharing their weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = unet if unet is not None else bundle.unet
    tes = text_encoders if text_encoders is not None else bundle.text_encoders
    # DDIM with the model's own betas and prediction type: deterministic for a given seed
    scheduler = DDIMScheduler.from_config({**bundle.scheduler_config, "_class_name": "DDIMScheduler", "clip_sample": False})
    if bundle.is_sdxl:
        pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=tes[0], text_encoder_2=tes[1],
                                         tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1],
                                         unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=tes[0], tokenizer=bundle.tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
