"""The base model a run trains: built straight from the WebUI checkpoint, or loaded from a diffusers folder."""

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

    folder: Optional[Path]  # the diffusers folder the modules came from; None when built from a single file
    family: str  # sd1 | sd2 | sd2-v | sdxl
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: List[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object  # a DDPMScheduler with the model's betas and prediction type
    scheduler_config: dict = field(default_factory=dict)
    source: Optional[object] = None  # the OpenedCheckpoint the modules were built from (no folder)

    def base_state_dict(self, component: str) -> Dict[str, torch.Tensor]:
        """One component's untrained weights as the base stores them (its own dtype, diffusers keys)."""
        if self.source is not None:
            return {e.name: e.produce() for e in self.source.plans[component].entries}
        from dreambooth_ext.bridge.diffusers_folder import component_state_dict

        return component_state_dict(Path(self.folder), component)

    def write_single_file(self, dst, **kwargs):
        """The base as a WebUI single file, with `replace` (component -> state dict) swapped in: see
        bridge.to_single.diffusers_to_single_file for the arguments."""
        from dreambooth_ext.bridge.to_single import checkpoint_to_single_file, diffusers_to_single_file

        if self.source is not None:
            return checkpoint_to_single_file(self.source, dst, **kwargs)
        return diffusers_to_single_file(self.folder, dst, **kwargs)

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
    from dreambooth_ext.bridge.family_data import new_text_encoder
    from dreambooth_ext.bridge.keymap_text import DERIVED_BUFFERS

    folder = Path(folder)
    fam = family_from_folder(folder)
    dtypes = {k: (dtypes or {}).get(k, torch_dtype) for k in ("unet", "vae", TEXT_ENCODER)}
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtypes["unet"],
                                                local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtypes["vae"], local_files_only=True)
    text_encoders, tokenizers = [], []
    for i, te in enumerate(fam["text_encoders"]):
        model = new_text_encoder(te).to(dtypes[TEXT_ENCODER])
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


def open_base(checkpoint: str, workspace: Path, family: str = "auto",
              dtypes: Optional[Dict[str, torch.dtype]] = None,
              progress: Optional[Callable[[str], None]] = None,
              should_stop: Optional[Callable[[], bool]] = None,
              devices: Optional[Dict[str, torch.device]] = None) -> ModelBundle:
    """The run's base model as modules: a diffusers folder is loaded (and checked for NaN/inf); a safetensors
    single file is built in memory, checked as a conversion checks it, and nothing is written to the
    workspace (a conversion an earlier version left in the workspace for this very file is loaded
    instead); a .ckpt is converted into the workspace once and loaded from there.

    `dtypes` and `devices` ("unet", "vae", "text_encoder" -> dtype / device; the placement's load_dtypes()
    and where("prepare")): a single file's weights go there as they are read, with no CPU copy of the model
    on the way; a folder is loaded on the CPU.
    """
    from dreambooth_ext.bridge.tensor_io import sniff_format
    from dreambooth_ext.bridge.to_diffusers import open_single_file
    from dreambooth_ext.train.finite import check_finite_base

    src = Path(checkpoint).expanduser()
    say = progress or log.info
    if src.is_dir():
        folder = prepare_base(checkpoint, workspace, family, progress, should_stop)  # checks model_index.json
        say(f"loading {folder}")
        bundle = load_bundle(folder, dtypes=dtypes)
        check_finite_base(bundle, folder)  # no conversion checked it
        return bundle
    if not src.is_file():
        raise UserError(f"The checkpoint {src} does not exist; give the path of a .safetensors or .ckpt file.")
    base = Path(workspace) / "base"
    if _read_marker(base / "source.json") == {**_source_key(src), "family": family} and \
            (base / "model" / "model_index.json").is_file():
        # an earlier run's conversion of this very file: loading it is quicker than reading the file again
        say(f"loading {base / 'model'}")
        return load_bundle(base / "model", dtypes=dtypes)
    if sniff_format(src) != "safetensors":
        # a .ckpt is unpickled whole into memory; the model built from it would keep that copy for the run
        # (the trained file is written from it). Converted to a folder once, its memory is freed.
        folder = prepare_base(checkpoint, workspace, family, progress, should_stop)
        say(f"loading {folder}")
        return load_bundle(folder, dtypes=dtypes)
    opened = open_single_file(src, family)
    for note in opened.notes:
        say(f"note: {note}")
    say(f"loading {src.resolve()} ({opened.detection.label}, {opened.family['scheduler'].get('prediction_type')})")
    return build_bundle(opened, dtypes=dtypes, should_stop=should_stop, devices=devices)


def _owned(t: torch.Tensor, source_storages: set) -> torch.Tensor:
    """`t`, or a copy of it where it shares memory with the checkpoint or with another weight (split rows)."""
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in source_storages:
        return t.clone()
    return t


def _loaded_state(opened, component: str, dtype: torch.dtype, device: torch.device, should_stop,
                  source_storages: set) -> Dict[str, torch.Tensor]:
    state = {}
    for entry in opened.entries(component, should_stop):  # refuses NaN/inf and stops on request, as converting does
        if entry.dtype.is_floating_point and entry.dtype != dtype:
            # the kept tensor first, what is read to fill it after: freed last, the read goes back to the system
            # at once instead of leaving holes in the heap that the next weights do not fit
            kept = torch.empty(entry.shape, dtype=dtype, device=device)
            kept.copy_(entry.produce())
            state[entry.name] = kept
        elif device.type != "cpu":
            state[entry.name] = entry.produce().to(device)
        else:
            state[entry.name] = _owned(entry.produce(), source_storages)
    return state


def _take(model: torch.nn.Module, state: Dict[str, torch.Tensor]):
    """Load `state` into a model made without weights: parameters take the tensors themselves, buffers the
    constructor made keep their own dtype (as a copying load leaves them). Returns (missing, unexpected)."""
    own = model.state_dict()
    made = {k for k, v in own.items() if not v.is_meta}
    model.load_state_dict({k: v for k, v in state.items() if k not in made}, strict=False, assign=True)
    model.load_state_dict({k: v for k, v in state.items() if k in made}, strict=False)
    return [k for k in own if k not in state], [k for k in state if k not in own]


def build_bundle(opened, torch_dtype: torch.dtype = torch.float32, dtypes: Optional[Dict[str, torch.dtype]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 devices: Optional[Dict[str, torch.device]] = None) -> ModelBundle:
    """Every module of a checked single file (bridge.to_diffusers.open_single_file), built without a folder.

    The same modules, configs, tokenizers and scheduler load_bundle gives from the folder the conversion
    would write, bit for bit. Modules are made without initialising weights and take each tensor as it is
    read, cast once to its dtype, so memory stays near the modules' own size.
    """
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreambooth_ext.bridge.components import text_encoder_name
    from dreambooth_ext.bridge.diffusers_folder import configs_as_read, family_from_configs
    from dreambooth_ext.bridge.family_data import new_text_encoder
    from dreambooth_ext.bridge.keymap_text import DERIVED_BUFFERS
    from dreambooth_ext.bridge.tensor_io import DictSource
    from dreambooth_ext.tokenizer_files import load_tokenizer

    configs = configs_as_read(opened.public_family())
    fam = family_from_configs(lambda rel: configs[rel], {"family": opened.family["family"]}, opened.path.name)
    dtypes = {k: (dtypes or {}).get(k, torch_dtype) for k in ("unet", "vae", "text_encoder")}
    devices = {k: torch.device((devices or {}).get(k, "cpu")) for k in ("unet", "vae", "text_encoder")}
    raw = opened.source
    while hasattr(raw, "_inner"):  # a renamed view: the tensors are its inner source's
        raw = raw._inner
    # a pickled checkpoint's tensors are handed out as they are: never let a module train in them
    source_storages = ({t.untyped_storage().data_ptr() for t in raw._tensors.values()}
                       if isinstance(raw, DictSource) else set())

    def diffusers_module(cls, name: str, dtype: torch.dtype, device: torch.device):
        with init_empty_weights():
            model = cls.from_config(configs[f"{name}/config.json"])
        missing, unexpected = _take(model, _loaded_state(opened, name, dtype, device, should_stop, source_storages))
        if missing or unexpected:
            raise UserError(f"{name} of {opened.path.name} does not fit its config: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}.")
        model = model.to(device, dtype)  # buffers made by the constructor, as from_pretrained casts them
        model.register_to_config(_name_or_path=str(opened.path))
        return model

    # the text encoders first: their token embeddings are the largest single tensors, and what is read
    # to fill one costs least while little else is loaded
    text_encoders, tokenizers = [], []
    for i, te in enumerate(fam["text_encoders"]):
        name = text_encoder_name(i)
        with init_empty_weights():
            model = new_text_encoder(te)
        missing, unexpected = _take(model, _loaded_state(opened, name, dtypes["text_encoder"],
                                                         devices["text_encoder"], should_stop, source_storages))
        missing = [k for k in missing if k not in DERIVED_BUFFERS]
        unexpected = [k for k in unexpected if k not in DERIVED_BUFFERS]
        if missing or unexpected:
            raise UserError(f"{name} of {opened.path.name} does not fit its config: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}.")
        text_encoders.append(model.to(devices["text_encoder"], dtypes["text_encoder"]))
        shipped = opened.family["text_encoders"][i]
        if shipped.get("tokenizer_dir"):
            tokenizers.append(transformers.CLIPTokenizer.from_pretrained(shipped["tokenizer_dir"]))
        else:
            tokenizers.append(load_tokenizer(shipped.get("tokenizer_pad", "<|endoftext|>"),
                                             shipped["config"].get("max_position_embeddings", 77)))
    vae = diffusers_module(AutoencoderKL, "vae", dtypes["vae"], devices["vae"])
    unet = diffusers_module(UNet2DConditionModel, "unet", dtypes["unet"], devices["unet"])
    scheduler_config = configs["scheduler/scheduler_config.json"]
    scheduler = DDPMScheduler.from_config(scheduler_config)
    for m in [unet, vae] + text_encoders:
        m.requires_grad_(False)
        m.eval()
    return ModelBundle(None, fam["family"], unet, vae, text_encoders, tokenizers, scheduler,
                       json.loads(json.dumps(scheduler_config)), source=opened)


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
