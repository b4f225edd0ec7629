"""WebUI single file -> diffusers folder."""

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

from dreambooth_ext.atomic import atomic_path
from dreambooth_ext.bridge.components import EMA_PREFIX, LEGACY_CLIP_PREFIX, base_family, components_for
from dreambooth_ext.bridge.detect import Detection, detect_family
from dreambooth_ext.bridge.diffusers_folder import EXTRAS, SIDECAR, write_configs
from dreambooth_ext.bridge.family_data import load_family
from dreambooth_ext.bridge.keymap_text import strip_legacy_clip
from dreambooth_ext.bridge.plan import cast_to, plan_to_diffusers, shapes_summary
from dreambooth_ext.bridge.tensor_io import Entry, RenamedSource, TensorSource, open_checkpoint, write_safetensors_stream
from dreambooth_ext.dtypes import DTYPES
from dreambooth_ext.errors import Cancelled, UserError

log = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    source: str
    destination: str
    family: str
    prediction_type: str
    inpainting: bool
    tensors: int
    extras: int
    ema_tensors: int
    notes: List[str] = field(default_factory=list)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _legacy_clip_keys(source: TensorSource) -> bool:
    return any(k.startswith(LEGACY_CLIP_PREFIX + "embeddings.") for k in source.keys())


def _with_modern_clip_keys(source: TensorSource) -> TensorSource:
    def rename(key: str) -> str:
        if key.startswith(LEGACY_CLIP_PREFIX):
            return LEGACY_CLIP_PREFIX + strip_legacy_clip(key[len(LEGACY_CLIP_PREFIX):])
        return key

    return RenamedSource(source, rename)


def resolve_family(src: Path, source: TensorSource, detection: Detection, family: str) -> dict:
    """The family dict to convert with: beside-yaml first, then the shipped config."""
    if family != "auto" and base_family(family) != detection.family:
        raise UserError(f"{src.name} is an {detection.label} checkpoint, not {family}; leave --family as auto or pick {detection.family}.")
    name = family if family != "auto" else detection.family
    fam = load_family(name)
    yaml_path = src.with_suffix(".yaml")
    if yaml_path.is_file():
        from dreambooth_ext.bridge.ldm_yaml import parse_yaml

        fam = parse_yaml(yaml_path, base=fam)
        fam["yaml_text"] = yaml_path.read_text()
        _infer_openclip_sizes(fam, source)
        if family != "auto":  # an explicit choice beats the yaml
            fam["family"] = name
            fam["scheduler"]["prediction_type"] = "v_prediction" if name == "sd2-v" else "epsilon"
    if detection.inpainting:
        fam["unet"]["in_channels"] = 9
    return fam


def _infer_openclip_sizes(fam: dict, source: TensorSource):
    """OpenCLIP towers are named by arch in a yaml, not sized: read their sizes off the weights."""
    from dreambooth_ext.bridge.components import TEXT_ENCODER_LAYOUTS

    for (prefix, layout), te in zip(TEXT_ENCODER_LAYOUTS[base_family(fam["family"])], fam["text_encoders"]):
        if layout != "openclip" or prefix + "token_embedding.weight" not in source:
            continue
        vocab, width = source.shape(prefix + "token_embedding.weight")
        head = prefix + "transformer.resblocks."
        blocks = {k[len(head):].split(".")[0] for k in source.keys() if k.startswith(head)}
        cfg = te["config"]
        cfg.update(vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // 64),
                   max_position_embeddings=source.shape(prefix + "positional_embedding")[0],
                   intermediate_size=source.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
                   # SD2 reads the penultimate layer, so diffusers keeps one layer fewer
                   num_hidden_layers=len(blocks) - (1 if base_family(fam["family"]) == "sd2" else 0))
        if prefix + "text_projection" in source:
            cfg["projection_dim"] = source.shape(prefix + "text_projection")[1]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`: its smallest and largest values are finite (a NaN propagates into both).
    A tenth of the time of isfinite(t).all() on a CPU, and no mask the size of the tensor."""
    if t.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(t.reshape(-1))
    except RuntimeError:  # a dtype an older torch has no aminmax kernel for on this device
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _checked(entries: List[Entry], src: Path, should_stop: Optional[Callable[[], bool]]) -> List[Entry]:
    """The same entries, each stopping on request and refusing NaN or infinite weights as it is read."""
    def wrap(entry: Entry):
        inner = entry.produce

        def produce():
            if should_stop is not None and should_stop():
                raise Cancelled()
            t = inner()
            if t.is_floating_point() and not all_finite(t):
                raise UserError(f"{src.name} holds NaN or infinite values ({entry.name}); the model is broken and "
                                "cannot be trained or converted: download it again or pick another one.")
            return t

        return Entry(entry.name, entry.shape, entry.dtype, produce)

    return [wrap(e) for e in entries]


class EntrySource(TensorSource):
    """Planned entries seen as a source: each tensor is produced when it is read."""

    def __init__(self, entries: List[Entry]):
        self._entries = {e.name: e for e in entries}

    def keys(self):
        return list(self._entries)

    def shape(self, key):
        return tuple(self._entries[key].shape)

    def dtype(self, key):
        return self._entries[key].dtype

    def get(self, key):
        return self._entries[key].produce()


class _ExtrasSource(TensorSource):
    """The keys of a checkpoint no component uses, in the order a written extras file lists them."""

    def __init__(self, source: TensorSource, keys: List[str]):
        self._source, self._keys = source, sorted(keys)

    def keys(self):
        return list(self._keys)

    def shape(self, key):
        return self._source.shape(key)

    def dtype(self, key):
        return self._source.dtype(key)

    def get(self, key):
        return self._source.get(key)


@dataclass
class OpenedCheckpoint:
    """A single file read as far as its headers and checked against its family's key tables.

    What a conversion writes out, and what a trainer builds its modules from without writing a folder:
    `entries(component)` reads and checks the weights one at a time, in the diffusers layout.
    """

    path: Path
    source: TensorSource  # legacy SD1 text-encoder names already renamed
    detection: Detection
    legacy_clip_keys: bool
    family: dict  # with yaml_text when a beside-yaml described it
    components: list
    plans: dict
    extra_keys: List[str]
    ema_keys: List[str]
    notes: List[str]
    _sha256: Optional[str] = None

    def entries(self, component: str, should_stop: Optional[Callable[[], bool]] = None) -> List[Entry]:
        """The component's tensors (diffusers keys), each refusing NaN or infinite values as it is read."""
        return _checked(self.plans[component].entries, self.path, should_stop)

    def component_source(self, component: str) -> TensorSource:
        return EntrySource(self.plans[component].entries)

    def extras_source(self) -> Optional[TensorSource]:
        return _ExtrasSource(self.source, self.extra_keys) if self.extra_keys else None

    def public_family(self) -> dict:
        return _public_family(self.family)

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def sidecar(self) -> dict:
        """What a converted folder records of its source, for the way back to a single file."""
        return {
            "source_name": self.path.name,
            "source_sha256": self.sha256(),
            "family": self.family["family"],
            "prediction_type": self.family["scheduler"].get("prediction_type", "epsilon"),
            "inpainting": self.detection.inpainting,
            "legacy_clip_keys": self.legacy_clip_keys,
            "yaml_text": self.family.get("yaml_text"),
            "extras": len(self.extra_keys),
            "ema_tensors": len(self.ema_keys),
            "source_metadata": getattr(self.source, "metadata", {}) or {},
        }


def open_single_file(src, family: str = "auto", dtype: Optional[torch.dtype] = None) -> OpenedCheckpoint:
    """Open and check a WebUI checkpoint: its family, every shape against the config, what is left over.

    Only headers are read (a pickled .ckpt is loaded whole). `dtype`: the float dtype the entries produce
    (None keeps the file's).
    """
    src = Path(src)
    source = open_checkpoint(src)
    detection = detect_family(source.shapes(), src.name)
    legacy = detection.family == "sd1" and _legacy_clip_keys(source)
    if legacy:
        source = _with_modern_clip_keys(source)
    fam = resolve_family(src, source, detection, family)
    notes = list(detection.notes) if fam["family"] == "sd2" else []

    comps = components_for(fam)
    plans = {c.name: plan_to_diffusers(c, source, dtype) for c in comps}
    problems = [p for plan in plans.values() for p in plan.problems]
    if problems:
        where = "its beside-yaml" if "yaml_text" in fam else f"the shipped {fam['family']} config"
        raise UserError(f"{src.name} does not match {where}: {shapes_summary(problems)}. "
                        "If it is a non-standard size, put the WebUI yaml that describes it beside it as "
                        f"{src.with_suffix('.yaml').name}.")
    consumed = set().union(*(p.consumed for p in plans.values()))
    extra_keys = [k for k in source.keys() if k not in consumed]
    ema = [k for k in extra_keys if k.startswith(EMA_PREFIX)]
    stray = [k for k in extra_keys if k.startswith(("model.diffusion_model.", "first_stage_model."))]
    if stray:
        notes.append(f"{len(stray)} model tensors outside the architecture were kept aside (e.g. {stray[0]})")
    if ema:
        notes.append(f"{len(ema)} EMA tensors (model_ema.*) were kept aside, not used for training; "
                     "a plain conversion back restores them")
    return OpenedCheckpoint(src, source, detection, legacy, fam, comps, plans, extra_keys, ema, notes)


def single_file_to_diffusers(src, dst, family: str = "auto", dtype: Optional[str] = None,
                             overwrite: bool = False, progress: Optional[Callable[[str], None]] = None,
                             should_stop: Optional[Callable[[], bool]] = None) -> ConvertReport:
    """Convert a WebUI checkpoint to a diffusers folder; nothing is left at `dst` on failure.

    `should_stop()` is asked before each tensor: a stop raises Cancelled and leaves nothing behind.
    """
    from dreambooth_ext.bridge.destination import check_destination

    src, dst = Path(src), Path(dst)
    say = progress or log.info
    check_destination(src, dst, overwrite, "folder")
    out_dtype = DTYPES[dtype] if dtype else None
    opened = open_single_file(src, family, out_dtype)
    fam, source, extra_keys = opened.family, opened.source, opened.extra_keys

    with atomic_path(dst) as tmp:
        say(f"converting {src.name} ({opened.detection.label}, {fam['scheduler'].get('prediction_type')}) to {dst}")
        for comp in opened.components:
            (tmp / comp.name).mkdir(parents=True)
            write_safetensors_stream(tmp / comp.name / comp.weights_file, opened.entries(comp.name, should_stop))
            say(f"  {comp.name}: {len(opened.plans[comp.name].entries)} tensors")
        if extra_keys:
            entries = [Entry(k, source.shape(k), cast_to(out_dtype, source.dtype(k)),
                             lambda k=k: source.get(k).to(cast_to(out_dtype, source.dtype(k)))) for k in extra_keys]
            write_safetensors_stream(tmp / EXTRAS, entries)
        write_configs(tmp, opened.public_family())
        sidecar = opened.sidecar()
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    tensors = sum(len(p.entries) for p in opened.plans.values())
    return ConvertReport(src.name, str(dst), fam["family"], sidecar["prediction_type"], opened.detection.inpainting,
                         tensors, len(extra_keys), len(opened.ema_keys), opened.notes)


def _public_family(fam: dict) -> dict:
    out = copy.deepcopy(fam)
    out.pop("yaml_text", None)
    return out
