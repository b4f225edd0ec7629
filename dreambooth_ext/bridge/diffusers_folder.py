"""The diffusers side: writing a folder's configs, and reading a folder back as a family + weights."""

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from dreambooth_ext.bridge.components import TEXT_ENCODER, base_family, encoder_suffix, text_encoder_name
from dreambooth_ext.bridge.tensor_io import DictSource, RenamedSource, SafetensorsSource, TensorSource
from dreambooth_ext.errors import UserError

DIFFUSERS_VERSION = "0.31.0"
SIDECAR = "dreambooth_ext.json"  # how this folder came from a single file, for the way back
EXTRAS = "single_file_extras.safetensors"  # single-file keys diffusers has no place for (EMA, unused layers)
TEXT_MODEL_HEADS = ("embeddings.", "encoder.", "final_layer_norm.")


def _dump(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def text_encoder_config_json(te: dict) -> dict:
    cfg = {k: v for k, v in te["config"].items() if not k.startswith("_")}
    cfg.update({"architectures": [te["class"]], "model_type": "clip_text_model"})
    return cfg


def folder_configs(family: dict) -> Dict[str, dict]:
    """Every JSON config of a diffusers folder for `family`, by path inside the folder (no tokenizer files)."""
    configs = {
        "unet/config.json": {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **family["unet"]},
        "vae/config.json": {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **family["vae"]},
    }
    scheduler = dict(family["scheduler"])
    scheduler.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    configs["scheduler/scheduler_config.json"] = scheduler
    index = {
        "_class_name": family["pipeline"],
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for i, te in enumerate(family["text_encoders"]):
        suffix = encoder_suffix(i)
        configs[f"{text_encoder_name(i)}/config.json"] = text_encoder_config_json(te)
        index[text_encoder_name(i)] = ["transformers", te["class"]]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if family["pipeline"] == "StableDiffusionPipeline":
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    else:
        index.update({"force_zeros_for_empty_prompt": True})
    configs["model_index.json"] = index
    return configs


def configs_as_read(family: dict) -> Dict[str, dict]:
    """folder_configs as a folder written with them reads back (JSON types, sorted keys)."""
    return {rel: json.loads(json.dumps(cfg, sort_keys=True)) for rel, cfg in folder_configs(family).items()}


def write_configs(folder: Path, family: dict):
    """Every config a diffusers pipeline folder needs besides the weights."""
    from dreambooth_ext.tokenizer_files import write_tokenizer

    for rel, cfg in folder_configs(family).items():
        _dump(folder / rel, cfg)
    for i, te in enumerate(family["text_encoders"]):
        tok_dir = folder / f"tokenizer{encoder_suffix(i)}"
        if te.get("tokenizer_dir"):
            _copy_tokenizer(Path(te["tokenizer_dir"]), tok_dir)
        else:
            write_tokenizer(tok_dir, pad_token=te.get("tokenizer_pad", "<|endoftext|>"),
                            model_max_length=te["config"].get("max_position_embeddings", 77))


def _copy_tokenizer(src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# ----------------------------------------------------------------------------- reading a folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent.parent.name} is not a complete diffusers folder: {path.parent.name}/{path.name} is missing.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None


def read_sidecar(folder: Path) -> dict:
    path = Path(folder) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else {}


def family_from_folder(folder: Path) -> dict:
    """A family dict (shipped-JSON shape) from a diffusers folder's own configs."""
    folder = Path(folder)
    return family_from_configs(lambda rel: _read_json(folder / rel), read_sidecar(folder), folder.name)


def family_from_configs(read: Callable[[str], dict], sidecar: dict, name: str) -> dict:
    """A family dict from a folder's configs, `read(path inside the folder)` giving each one."""
    index = read("model_index.json")
    pipeline = index.get("_class_name", "")
    if "XL" in pipeline:
        names = [text_encoder_name(0), text_encoder_name(1)]
    elif pipeline.startswith("StableDiffusion"):
        names = [text_encoder_name(0)]
    else:
        raise UserError(f"{name} holds a {pipeline or 'unknown'} pipeline; only Stable Diffusion 1.x/2.x/XL folders convert to a WebUI checkpoint.")
    text_encoders = []
    for te_name in names:
        cfg = read(f"{te_name}/config.json")
        if "text_config" in cfg:  # a full CLIPConfig: the text part is what we need
            cfg = cfg["text_config"]
        cls = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version", "torch_dtype", "_name_or_path")}
        text_encoders.append({"class": cls, "config": cfg})
    scheduler = read("scheduler/scheduler_config.json")
    unet = _strip_private(read("unet/config.json"))
    prediction = scheduler.get("prediction_type", "epsilon")
    if len(names) == 2:
        family = "sdxl"
    elif text_encoders[0]["config"].get("hidden_act") == "gelu":
        family = "sd2-v" if prediction == "v_prediction" else "sd2"
    else:
        family = "sd1"
    family = sidecar.get("family", family)
    if base_family(family) == "sd2":
        family = "sd2-v" if prediction == "v_prediction" else "sd2"
    return {
        "family": family,
        "pipeline": pipeline,
        "unet": unet,
        "vae": _strip_private(read("vae/config.json")),
        "text_encoders": text_encoders,
        "scheduler": scheduler,
    }


def _strip_private(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _weights_path(sub: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (sub / name).is_file():
            return sub / name
    if any(sub.glob("*.safetensors.index.json")):
        raise UserError(f"{sub} holds sharded weights; save the model unsharded (max_shard_size large enough) and try again.")
    raise UserError(f"{sub} has no weights file (diffusion_pytorch_model.safetensors or model.safetensors).")


def open_component(folder: Path, name: str) -> TensorSource:
    """A component's weights, keys normalised to what transformers 4.x / diffusers expect."""
    path = _weights_path(Path(folder) / name)
    if path.suffix == ".safetensors":
        try:
            source: TensorSource = SafetensorsSource(path)
        except Exception as e:
            raise UserError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0]}); it may be truncated.") from None
    else:
        try:
            source = DictSource(torch.load(str(path), map_location="cpu", weights_only=True))
        except Exception as e:
            raise UserError(f"{path} was refused or could not be read ({str(e).splitlines()[0][:160]}); nothing in it was executed.") from None
    if name.startswith(TEXT_ENCODER) and _is_v5_text_layout(source.keys()):
        # transformers 5 saves CLIP text models without the `text_model.` level; 4.x would
        # silently leave such weights random, so put the level back
        source = RenamedSource(source, lambda k: "text_model." + k if k.startswith(TEXT_MODEL_HEADS) else k)
    return source


def _is_v5_text_layout(keys) -> bool:
    keys = list(keys)
    return any(k.startswith(TEXT_MODEL_HEADS) for k in keys) and not any(k.startswith("text_model.") for k in keys)


def component_state_dict(folder: Path, name: str) -> Dict[str, torch.Tensor]:
    """All tensors of one component, normalised: what a trainer loads into its model."""
    source = open_component(folder, name)
    return {k: source.get(k) for k in source.keys()}


def extras_source(folder: Path) -> Optional[TensorSource]:
    path = Path(folder) / EXTRAS
    return SafetensorsSource(path) if path.is_file() else None

