"""diffusers folder -> WebUI single file (.safetensors by default, .ckpt on request)."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from dreambooth_ext.atomic import atomic_path
from dreambooth_ext.bridge import is_checkpoint_name
from dreambooth_ext.bridge.components import EMA_PREFIX, LEGACY_CLIP_PREFIX, base_family, components_for
from dreambooth_ext.bridge.diffusers_folder import extras_source, family_from_folder, open_component, read_sidecar
from dreambooth_ext.bridge.family_data import load_family
from dreambooth_ext.bridge.plan import cast_to, plan_to_single, shapes_summary
from dreambooth_ext.bridge.tensor_io import DictSource, Entry, write_ckpt_atomic, write_safetensors_atomic
from dreambooth_ext.dtypes import DTYPES
from dreambooth_ext.errors import UserError

log = logging.getLogger(__name__)

ARCHITECTURES = {  # modelspec.architecture values other tools read
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
# what decides whether the WebUI can load a file without a beside-yaml
ARCH_KEYS = {
    "unet": ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
             "transformer_layers_per_block", "down_block_types", "use_linear_projection"),
    "vae": ("block_out_channels", "layers_per_block", "latent_channels"),
    "text": ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"),
}


@dataclass
class WriteReport:
    path: str
    family: str
    tensors: int
    yaml_path: Optional[str] = None
    notes: List[str] = field(default_factory=list)


def is_standard(fam: dict) -> bool:
    """Does the WebUI know this architecture without being told (no yaml needed)?"""
    ref = load_family("sd2" if base_family(fam["family"]) == "sd2" else fam["family"])

    def same(a: dict, b: dict, keys) -> bool:
        return all(_norm(a.get(k)) == _norm(b.get(k)) for k in keys if k in b)

    return (same(fam["unet"], ref["unet"], ARCH_KEYS["unet"]) and same(fam["vae"], ref["vae"], ARCH_KEYS["vae"])
            and all(same(a["config"], b["config"], ARCH_KEYS["text"]) for a, b in zip(fam["text_encoders"], ref["text_encoders"])))


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def _legacy_name(key: str) -> str:
    """Undo the `text_model.` level for files that came without it."""
    head = LEGACY_CLIP_PREFIX + "text_model."
    return LEGACY_CLIP_PREFIX + key[len(head):] if key.startswith(head) else key


def diffusers_to_single_file(src, dst, dtype: Optional[str] = None, metadata: Optional[Dict[str, str]] = None,
                             keep_ema: bool = True, overwrite: bool = True,
                             progress: Optional[Callable[[str], None]] = None,
                             replace: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> WriteReport:
    """Write a diffusers folder as one WebUI checkpoint (suffix .safetensors or .ckpt decides the format).

    `replace` maps a component name (unet, text_encoder, ...) to an in-memory state dict used
    instead of the folder's file: how a trainer writes its result without a folder copy.
    EMA tensors the folder kept aside from its source are restored when `keep_ema`; a trainer
    passes False, since those no longer match the trained weights.
    """
    src, dst = Path(src), Path(dst)
    say = progress or log.info
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; a diffusers model is a folder with model_index.json in it.")
    if not is_checkpoint_name(dst):
        raise UserError(f"{dst.name}: the output must end in .safetensors (recommended) or .ckpt.")
    from dreambooth_ext.bridge.destination import check_destination

    check_destination(src, dst, overwrite, "file")
    return _write_single(src.name, family_from_folder(src), read_sidecar(src), lambda name: open_component(src, name),
                         extras_source(src), dst, dtype, metadata, keep_ema, overwrite, say, replace)


def checkpoint_to_single_file(opened, dst, dtype: Optional[str] = None, metadata: Optional[Dict[str, str]] = None,
                              keep_ema: bool = True, overwrite: bool = True,
                              progress: Optional[Callable[[str], None]] = None,
                              replace: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> WriteReport:
    """diffusers_to_single_file for a base read straight from its single file (an OpenedCheckpoint, see
    to_diffusers.open_single_file): the same file the folder converted from it would give, without the folder."""
    from dreambooth_ext.bridge.destination import check_destination
    from dreambooth_ext.bridge.diffusers_folder import configs_as_read, family_from_configs

    dst = Path(dst)
    if not is_checkpoint_name(dst):
        raise UserError(f"{dst.name}: the output must end in .safetensors (recommended) or .ckpt.")
    check_destination(opened.path, dst, overwrite, "file")
    sidecar = opened.sidecar()
    configs = configs_as_read(opened.public_family())
    fam = family_from_configs(lambda rel: configs[rel], sidecar, opened.path.name)
    return _write_single(opened.path.name, fam, sidecar, opened.component_source, opened.extras_source(), dst,
                         dtype, metadata, keep_ema, overwrite, progress or log.info, replace)


def _write_single(label: str, fam: dict, sidecar: dict, open_comp: Callable[[str], object], extras, dst: Path,
                  dtype: Optional[str], metadata: Optional[Dict[str, str]], keep_ema: bool, overwrite: bool,
                  say: Callable[[str], None], replace: Optional[Dict[str, Dict[str, torch.Tensor]]]) -> WriteReport:
    yaml_path = dst.with_suffix(".yaml")
    if _needs_yaml(fam, sidecar) and yaml_path.exists() and not overwrite:
        raise UserError(f"{yaml_path} already exists and the new model needs its own; pass --overwrite to "
                        "replace it, or choose another name.")
    out_dtype = DTYPES[dtype] if dtype else None
    comps = components_for(fam)
    entries: List[Entry] = []
    problems: List[str] = []
    for comp in comps:
        given = (replace or {}).get(comp.name)
        source = DictSource(given) if given is not None else open_comp(comp.name)
        plan = plan_to_single(comp, source, out_dtype)
        entries += plan.entries
        problems += plan.problems
    if problems:
        raise UserError(f"{label} cannot be written as a single file: {shapes_summary(problems)}.")

    notes: List[str] = []
    entries += _extras(extras, {e.name for e in entries}, keep_ema, out_dtype, notes)
    if sidecar.get("legacy_clip_keys"):
        for e in entries:
            e.name = _legacy_name(e.name)
    meta = _metadata(fam, sidecar, metadata)
    say(f"writing {dst} ({len(entries)} tensors)")
    if dst.suffix.lower() == ".ckpt":
        write_ckpt_atomic(dst, entries, meta)
    else:
        write_safetensors_atomic(dst, entries, meta)
    yaml_path = _write_beside_yaml(dst, fam, sidecar)
    return WriteReport(str(dst), fam["family"], len(entries), str(yaml_path) if yaml_path else None, notes)


def _extras(extras, taken, keep_ema: bool, out_dtype, notes: List[str]) -> List[Entry]:
    if extras is None:
        return []
    out = []
    dropped = 0
    for k in extras.keys():
        if k in taken:
            continue  # the model's own weight wins over a stale copy
        if k.startswith(EMA_PREFIX) and not keep_ema:
            dropped += 1
            continue
        dt = cast_to(out_dtype, extras.dtype(k))
        out.append(Entry(k, extras.shape(k), dt, lambda k=k, dt=dt: extras.get(k).to(dt)))
    if dropped:
        notes.append(f"{dropped} EMA tensors of the source were left out: they no longer match the trained weights")
    return out


def _metadata(fam: dict, sidecar: dict, extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    meta = {
        "modelspec.architecture": ARCHITECTURES[fam["family"]],
        "modelspec.prediction_type": fam["scheduler"].get("prediction_type", "epsilon"),
        "dreambooth_ext.family": fam["family"],
    }
    if sidecar.get("source_name"):
        meta["dreambooth_ext.source_name"] = sidecar["source_name"]
        meta["dreambooth_ext.source_sha256"] = sidecar.get("source_sha256", "")
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def _needs_yaml(fam: dict, sidecar: dict) -> bool:
    return bool(sidecar.get("yaml_text")) or fam["family"] == "sd2-v" or not is_standard(fam)


def _write_beside_yaml(dst: Path, fam: dict, sidecar: dict) -> Optional[Path]:
    """NAME.yaml tells the WebUI the config: for v-prediction and for sizes it cannot guess."""
    yaml_path = dst.with_suffix(".yaml")
    if sidecar.get("yaml_text"):
        text = sidecar["yaml_text"]
    elif _needs_yaml(fam, sidecar):
        from dreambooth_ext.bridge.ldm_yaml_write import generate_yaml

        text = generate_yaml(fam)
    else:
        if yaml_path.is_file():
            log.warning("%s exists beside the new file and may not describe it", yaml_path.name)
        return None
    with atomic_path(yaml_path) as tmp:
        tmp.write_text(text)
    return yaml_path



