"""The typed training config: every setting declared once, with its type, default, range and help.

The CLI, a JSON config file and the gradio tab all read the same fields. A UI walks
`describe()` (or `dataclasses.fields`) to build its form; nothing here imports gradio.

    cfg = load_config("cfg.json")          # or load_config({...}); coerces types, refuses unknown keys
    warnings = validate(cfg)               # raises UserError for the first hard error
    save_config(cfg, "cfg.json")           # exact round trip

Paths left empty get defaults from the models folder (see `workspace_path` and `class_path`):
the workspace is `<models_dir>/dreambooth/<name>`, beside the WebUI's own model folders, so a
run's class images, samples and resumable state live with the models it writes.
"""

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from dreambooth_ext.errors import UserError

GROUPS = ("model", "concepts", "class images", "training", "optimizer", "lora", "text encoder",
          "memory & speed", "samples", "saving")

FAMILIES = ("auto", "sd1", "sd2", "sd2-v", "sdxl")
OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LORA_TARGETS = ("attention", "attention_ff", "attention_ff_conv")
CAPTION_MODES = ("prompt", "filewords", "caption")
FILEWORDS = "[filewords]"


def setting(default: Any, help: str, group: str, *, min: Optional[float] = None, max: Optional[float] = None,
            choices: Optional[typing.Sequence[str]] = None, multiple_of: Optional[int] = None):
    """A dataclass field carrying what a CLI or a form needs to show and check it."""
    meta = {"help": help, "group": group, "min": min, "max": max,
            "choices": list(choices) if choices else None, "multiple_of": multiple_of}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Concept:
    """One subject or style: its images, the prompt that names it, and its class for prior preservation."""

    instance_dir: str = setting("", "Folder with the 5-50 pictures of the subject or style.", "concepts")
    instance_prompt: str = setting(
        "", "Prompt naming the concept with a rare token, e.g. 'a photo of sks_pixarstyle character'; "
        "may contain [filewords].", "concepts")
    caption_mode: str = setting(
        "prompt", "prompt: the instance prompt alone; filewords: the .txt beside each image replaces "
        "[filewords] in the prompt; caption: the .txt replaces the prompt (images without one use the prompt).",
        "concepts", choices=CAPTION_MODES)
    instance_token: str = setting(
        "", "The token the concept is learned under, when it is a real word the rare-token check "
        "would miss (empty: found from the prompts).", "concepts")
    class_prompt: str = setting(
        "", "Prompt for the concept's class without the token, e.g. 'a pixar-style character' "
        "(empty: no prior preservation for this concept).", "class images")
    class_dir: str = setting(
        "", "Folder of class images; missing ones are generated with the base model and kept "
        "(empty: a folder in the workspace named after the class prompt).", "class images")
    num_class_images: int = setting(
        100, "Class images used for prior preservation (diffusers' default is 100; 0 = none).",
        "class images", min=0, max=10000)


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults follow diffusers' train_dreambooth.py and kohya's sd-scripts."""

    # model
    checkpoint: str = setting("", "Source model: a WebUI checkpoint (.safetensors/.ckpt) or a diffusers folder.", "model")
    name: str = setting("", "Name of the new model; files are written as NAME_<step>.safetensors.", "model")
    models_dir: str = setting(
        "models", "The WebUI's models folder; checkpoints go to its Stable-diffusion/, LoRAs to its Lora/.", "model")
    checkpoint_dir: str = setting(
        "", "Where new checkpoints go (empty: MODELS_DIR/Stable-diffusion; the WebUI passes its --ckpt-dir).", "model")
    lora_dir: str = setting(
        "", "Where new LoRA files go (empty: MODELS_DIR/Lora; the WebUI passes its --lora-dir).", "model")
    workspace_dir: str = setting(
        "", "Folder for class images, samples and resumable state (empty: MODELS_DIR/dreambooth/NAME).", "model")
    family: str = setting(
        "auto", "Model family; auto reads it from the checkpoint. Use sd2-v for 768-v SD2 models, "
        "whose weights cannot tell.", "model", choices=FAMILIES)

    # concepts
    concepts: List[Concept] = setting([], "The subjects or styles to teach, each with its own images and prompts.",
                                      "concepts")

    # class images
    class_image_steps: int = setting(30, "Sampling steps per generated class image.", "class images", min=1, max=200)
    class_image_guidance: float = setting(7.0, "CFG scale for generated class images.", "class images", min=0, max=30)
    class_image_batch_size: int = setting(4, "Class images generated at once; lower it if generation runs out of memory.",
                                          "class images", min=1, max=64)
    class_image_negative_prompt: str = setting("", "Negative prompt for generated class images.", "class images")

    # training
    train_mode: str = setting("full", "full: train the whole UNet (a new checkpoint); lora: train small LoRA "
                              "adapters (a file for the Lora folder, far less memory).", "training",
                              choices=("full", "lora"))
    resolution: int = setting(512, "Training resolution in pixels (SD1 and SD2 512, SD2 768-v 768, SDXL 1024).",
                              "training", min=64, max=4096, multiple_of=8)
    max_steps: int = setting(800, "Optimizer steps to train; about 100-200 per instance image is typical.",
                             "training", min=1, max=1_000_000)
    train_batch_size: int = setting(1, "Images per step (instance and class images are each this many).",
                                    "training", min=1, max=64)
    gradient_accumulation_steps: int = setting(
        1, "Batches added up before each optimizer step: a larger effective batch with the memory of one.",
        "training", min=1, max=256)
    seed: int = setting(1234, "Random seed; the same seed and settings give the same run.", "training",
                        min=0, max=2**32 - 1)
    prior_loss_weight: float = setting(
        1.0, "Weight of the class-image loss (prior preservation): keeps the class from turning into the "
        "concept; 0 turns it off.", "training", min=0, max=10)
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting gamma (5 is the paper's value); 0 = off.",
                                   "training", min=0, max=100)
    offset_noise: float = setting(0.0, "Offset noise strength (0.05-0.1 helps very dark or bright images); 0 = off.",
                                  "training", min=0, max=1)
    bucketing: bool = setting(True, "Group images by aspect ratio instead of cropping every image square.", "training")
    bucket_step: int = setting(64, "Bucket sizes are multiples of this many pixels.", "training",
                               min=8, max=256, multiple_of=8)
    bucket_upscale: bool = setting(False, "Let bucketing upscale images smaller than the training resolution "
                                   "(off: small images keep their size).", "training")
    center_crop: bool = setting(True, "Crop the centre of each image (off: a random crop each time).", "training")
    hflip: bool = setting(False, "Randomly mirror images; leave off for asymmetric subjects or text.", "training")
    use_ema: bool = setting(False, "Keep an exponential moving average of the trained weights and save it "
                            "(smoother results, one more copy of the weights in memory).", "training")
    ema_decay: float = setting(0.9999, "EMA decay: the closer to 1, the more steps the average spans.",
                               "training", min=0, max=1)

    # optimizer
    optimizer: str = setting("adamw", "adamw; adamw8bit and lion8bit need bitsandbytes (less memory); adafactor "
                             "(little memory); prodigy (finds its own step size: use learning rate 1.0).",
                             "optimizer", choices=OPTIMIZERS)
    learning_rate: float = setting(2e-6, "UNet learning rate for full training (1e-6 to 5e-6 is usual).",
                                   "optimizer", min=0, max=10)
    lora_learning_rate: float = setting(1e-4, "UNet learning rate for LoRA training (used instead of learning_rate).",
                                        "optimizer", min=0, max=10)
    adam_beta1: float = setting(0.9, "First-moment decay of Adam-style optimizers (Lion too).", "optimizer", min=0, max=1)
    adam_beta2: float = setting(0.999, "Second-moment decay of Adam-style optimizers (Lion: 0.99 is usual).",
                                "optimizer", min=0, max=1)
    adam_epsilon: float = setting(1e-8, "Adam's epsilon.", "optimizer", min=0, max=1)
    weight_decay: float = setting(1e-2, "Decoupled weight decay.", "optimizer", min=0, max=10)
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm; 0 = no clipping.", "optimizer", min=0, max=1000)
    lr_scheduler: str = setting("constant", "How the learning rate changes over the run.", "optimizer",
                                choices=SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Steps over which the learning rate ramps up from 0 (not used by 'constant').",
                                   "optimizer", min=0, max=1_000_000)
    lr_num_cycles: int = setting(1, "Restarts of cosine_with_restarts.", "optimizer", min=1, max=1000)
    lr_power: float = setting(1.0, "Power of the polynomial schedule (1 = linear decay).", "optimizer", min=0, max=10)

    # lora
    lora_rank: int = setting(16, "LoRA rank: capacity of the adapters and size of the file.", "lora", min=1, max=256)
    lora_alpha: float = setting(0.0, "LoRA alpha; the update is scaled by alpha/rank (0 = same as the rank).",
                                "lora", min=0, max=1024)
    lora_targets: str = setting("attention", "Layers that get adapters: attention (diffusers' default), "
                                "attention_ff adds feed-forward (more capacity, good for styles), "
                                "attention_ff_conv adds convolutions.", "lora", choices=LORA_TARGETS)
    init_lora: str = setting("", "Start from an earlier LoRA file, to train in phases (empty: fresh adapters).", "lora")

    # text encoder
    text_encoder_mode: str = setting(
        "frozen", "frozen (least memory, embeddings cacheable); full (better likeness of faces, much more memory); "
        "lora (adapters on the text encoder too).", "text encoder", choices=("frozen", "full", "lora"))
    text_encoder_lr: float = setting(1e-6, "Text encoder learning rate when it is trained fully.", "text encoder",
                                     min=0, max=10)
    text_encoder_lora_lr: float = setting(5e-5, "Text encoder learning rate when it gets LoRA adapters.",
                                          "text encoder", min=0, max=10)
    text_encoder_stop_step: int = setting(0, "Step after which the text encoder stops training (0 = never stops); "
                                          "it overfits sooner than the UNet.", "text encoder", min=0, max=1_000_000)

    # memory & speed
    mixed_precision: str = setting("auto", "auto: bf16 where the GPU supports it, else fp16 with loss scaling; "
                                   "fp32 on a CPU.", "memory & speed", choices=("auto", "no", "fp16", "bf16"))
    attention: str = setting("auto", "auto: xformers when importable on CUDA, else PyTorch SDPA.", "memory & speed",
                             choices=("auto", "xformers", "sdpa", "default"))
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: much less memory, "
                                           "about 25% slower.", "memory & speed")
    cache_latents: bool = setting(True, "Encode each image with the VAE once instead of at every step "
                                  "(much faster, little memory).", "memory & speed")
    cache_text_embeddings: bool = setting(True, "Encode each prompt once; only while the text encoder is frozen.",
                                          "memory & speed")
    dataloader_workers: int = setting(0, "Worker processes loading images (0 = in the main process; "
                                      "enough when latents are cached).", "memory & speed", min=0, max=32)

    # samples
    sample_every: int = setting(0, "Generate samples every this many steps (0 = off; 200 is a good value).",
                                "samples", min=0, max=1_000_000)
    sample_prompts: List[str] = setting([], "Extra sample prompts; each concept's instance prompt is always sampled.",
                                        "samples")
    sample_negative_prompt: str = setting("", "Negative prompt for samples.", "samples")
    sample_seeds: List[int] = setting([], "One seed per sample image, the same at every sampling; missing ones "
                                      "count up from the last given (or from seed).", "samples")
    num_sample_images: int = setting(2, "Sample images per prompt.", "samples", min=1, max=16)
    sample_steps: int = setting(20, "Sampling steps per sample image.", "samples", min=1, max=200)
    sample_guidance: float = setting(7.0, "CFG scale for samples.", "samples", min=0, max=30)

    # saving
    save_model_every: int = setting(0, "Write the model every this many steps as NAME_<step> (0 = only at the end).",
                                    "saving", min=0, max=1_000_000)
    save_state_every: int = setting(0, "Save resumable training state every this many steps (0 = only at the end); "
                                    "full training states are large (about 3x the model).", "saving",
                                    min=0, max=1_000_000)
    save_format: str = setting("safetensors", "File format; .ckpt is a pickle, prefer safetensors.", "saving",
                               choices=("safetensors", "ckpt"))
    save_dtype: str = setting("fp16", "Precision of the written weights (fp16 halves the file; the WebUI runs it "
                              "the same).", "saving", choices=("fp16", "bf16", "fp32"))
    save_lora_merged: bool = setting(False, "With LoRA training, also write a full checkpoint with the LoRA "
                                     "merged in.", "saving")

    @property
    def unet_learning_rate(self) -> float:
        return self.lora_learning_rate if self.train_mode == "lora" else self.learning_rate

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.text_encoder_lora_lr if self.text_encoder_mode == "lora" else self.text_encoder_lr

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha or float(self.lora_rank)

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.models_dir) / "Stable-diffusion"

    def lora_path(self) -> Path:
        return Path(self.lora_dir) if self.lora_dir else Path(self.models_dir) / "Lora"

    def workspace_path(self) -> Path:
        return Path(self.workspace_dir) if self.workspace_dir else Path(self.models_dir) / "dreambooth" / self.name

    def class_path(self, concept: Concept) -> Path:
        """The concept's class folder; the default is keyed by the class prompt, so concepts sharing one share images."""
        if concept.class_dir:
            return Path(concept.class_dir)
        slug = re.sub(r"[^a-z0-9]+", "_", concept.class_prompt.lower()).strip("_")[:48] or "class"
        digest = hashlib.sha1(concept.class_prompt.encode("utf-8")).hexdigest()[:8]
        return self.workspace_path() / "class_images" / f"{slug}_{digest}"


# ---------------------------------------------------------------------------------------------
# Introspection for forms


@dataclass(frozen=True)
class SettingInfo:
    name: str
    kind: str  # bool | int | float | str | list[str] | list[int] | concepts
    default: Any
    help: str
    group: str
    min: Optional[float]
    max: Optional[float]
    choices: Optional[List[str]]
    multiple_of: Optional[int]


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(tp) -> str:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return "concepts" if item is Concept else f"list[{item.__name__}]"
    return tp.__name__


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def describe(cls=TrainConfig) -> List[SettingInfo]:
    """The settings of TrainConfig (or Concept) in declaration order, for building a form."""
    hints = _hints(cls)
    return [SettingInfo(f.name, _kind(hints[f.name]), _default(f), f.metadata["help"], f.metadata["group"],
                        f.metadata["min"], f.metadata["max"], f.metadata["choices"], f.metadata["multiple_of"])
            for f in fields(cls)]


# ---------------------------------------------------------------------------------------------
# Coercion from JSON / dicts

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _bad(where: str, wanted: str, value: Any) -> UserError:
    return UserError(f"Setting {where} must be {wanted}, not {json.dumps(value, default=str)}.")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(where, "true or false", value)


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, str):  # "800" or "8e2" from a text box
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _bad(where, "a whole number", value)


def _to_float(value: Any, where: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise _bad(where, "a finite number", value)
    return number


def _to_str(value: Any, where: str) -> str:
    if value is None:  # JSON null for an optional text
        return ""
    if isinstance(value, str):
        return value
    raise _bad(where, "text", value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # a lone value is a list of one
        if item is Concept:
            return [_from_dict(Concept, v, f"concept {i}{where}") for i, v in enumerate(items, 1)]
        return [_coerce(v, item, where) for v in items]
    return _SCALARS[tp](value, where)


def _unknown_key(key: str, cls, where: str) -> UserError:
    names = [f.name for f in fields(cls)]
    other = Concept if cls is TrainConfig else TrainConfig
    if key in {f.name for f in fields(other)}:
        place = "inside each entry of 'concepts'" if other is Concept else "at the top level, not inside a concept"
        return UserError(f"Setting '{key}' in {where} belongs {place}.")
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "see --help for the list of settings."
    return UserError(f"Unknown setting '{key}' in {where}; {hint}")


def _from_dict(cls, data: Any, where: str):
    if isinstance(data, (TrainConfig, Concept)):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise UserError(f"The settings of {where} must be a JSON object, not {type(data).__name__}.")
    hints, names = _hints(cls), {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")  # accept CLI spelling in files too
        if name not in names:
            raise _unknown_key(str(key), cls, where)
        label = f"'{name}' in {where}" if cls is TrainConfig else f"'{name}' of {where}"
        kwargs[name] = _coerce(value, hints[name], label if name != "concepts" else f" in {where}")
    return cls(**kwargs)


def to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """Plain JSON-ready dict, fields in declaration order, concepts as a list of objects."""
    return dataclasses.asdict(cfg)


def load_config(source: Union[str, os.PathLike, Dict[str, Any], TrainConfig]) -> TrainConfig:
    """A TrainConfig from a JSON file or a dict; types are coerced, unknown keys refused. Not range-checked: see validate."""
    if isinstance(source, (dict, TrainConfig)):
        return _from_dict(TrainConfig, source, "the config")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"Config file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except UnicodeDecodeError:
        raise UserError(f"Config file {path} is not a UTF-8 text file.") from None
    return _from_dict(TrainConfig, data, str(path))


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike]) -> Path:
    """Write cfg as JSON, atomically (a temporary name, then a rename); load_config reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Validation

_NAME_BAD_CHARS = '/\\:*?"<>|'
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
_KNOWN_TOKENS = {"sks", "ohwx", "zwx", "mksks", "xyz"}


def _check_fields(obj, where: str) -> None:
    """Types (coerced in place), ranges and choices of every field of a TrainConfig or Concept."""
    hints = _hints(type(obj))
    for f in fields(obj):
        if f.name == "concepts":
            continue
        label = f"'{f.name}'{where}"
        value = _coerce(getattr(obj, f.name), hints[f.name], label)
        setattr(obj, f.name, value)
        _check_range(value, f.metadata, label)


def _check_range(value: Any, meta: Dict[str, Any], label: str) -> None:
    low, high, choices, step = meta["min"], meta["max"], meta["choices"], meta["multiple_of"]
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"Setting {label} is '{value}'; choose one of {', '.join(choices)}{hint}.")
    if low is not None and value < low:
        raise UserError(f"Setting {label} is {value}; it must be at least {low}.")
    if high is not None and value > high:
        raise UserError(f"Setting {label} is {value}; it must be at most {high}.")
    if step and value % step:
        raise UserError(f"Setting {label} is {value}; it must be a multiple of {step} (e.g. {round(value / step) * step}).")


def _check_name(name: str) -> None:
    if not name.strip():
        raise UserError("Setting 'name' is empty; give the new model a name (it becomes the file name).")
    bad = [c for c in name if c in _NAME_BAD_CHARS or ord(c) < 32]
    if bad:
        raise UserError(f"Setting 'name' ({name!r}) contains {bad[0]!r}; use a plain file name without "
                        f"path separators or any of {_NAME_BAD_CHARS}.")
    if name != name.strip() or name.endswith(".") or name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise UserError(f"Setting 'name' ({name!r}) is not a usable file name; avoid leading or trailing spaces "
                        "or dots and reserved names such as CON or NUL.")


def _words(text: str) -> List[str]:
    return re.findall(r"[\w]+", text.replace(FILEWORDS, " ").lower())


def _looks_rare(word: str) -> bool:
    """A made-up token: digits or underscores, a known one, or no vowels (sks, zwx)."""
    return (any(c.isdigit() or c == "_" for c in word) or word in _KNOWN_TOKENS
            or (len(word) >= 3 and not any(v in word for v in "aeiou")))


def _token_warnings(c: Concept, label: str) -> List[str]:
    if c.caption_mode == "caption" or not c.instance_prompt.strip():
        return []  # captions replace the prompt: the token lives in them
    prompt, klass = c.instance_prompt, c.class_prompt
    if c.instance_token:
        token = c.instance_token.lower()
        if token not in prompt.lower():
            return [f"{label}'s instance prompt {prompt!r} does not contain its instance_token {c.instance_token!r}."]
        if token in klass.lower():
            return [f"{label}'s class prompt also contains its token {c.instance_token!r}, so prior preservation "
                    "pulls the concept back out; remove the token from the class prompt."]
        return []
    class_words = set(_words(klass))
    distinct = [w for w in _words(prompt) if w not in class_words]
    if not distinct:
        return [f"{label}'s instance prompt {prompt!r} has no word its class prompt lacks, so the model cannot tell "
                "the concept from its class; add a rare token such as 'sks'."]
    if not any(_looks_rare(w) for w in distinct):
        return [f"{label}'s instance prompt {prompt!r} has no rare token (a made-up word such as 'sks' or "
                "'sks_pixarstyle'), so training overwrites a common word; set instance_token if that is meant."]
    return []


def _concept_warnings(cfg: TrainConfig, c: Concept, i: int) -> List[str]:
    label = f"Concept {i}"
    if not c.instance_dir.strip():
        raise UserError(f"Setting 'instance_dir' of concept {i} is empty; give the folder with the instance images.")
    if not c.instance_prompt.strip() and c.caption_mode != "caption":
        raise UserError(f"Setting 'instance_prompt' of concept {i} is empty; give a prompt with the concept's token.")
    notes = _token_warnings(c, label)
    if c.caption_mode == "filewords" and FILEWORDS not in c.instance_prompt:
        notes.append(f"{label} uses caption_mode 'filewords' but its instance prompt has no {FILEWORDS}, "
                     "so the captions are not used.")
    if c.caption_mode == "prompt" and FILEWORDS in c.instance_prompt:
        notes.append(f"{label}'s prompt has {FILEWORDS} but caption_mode is 'prompt', so it is dropped; "
                     "use caption_mode 'filewords' to fill it from the .txt files.")
    if not c.class_prompt.strip():
        if cfg.prior_loss_weight > 0:
            notes.append(f"{label} has no class prompt, so prior preservation is off for it.")
        if c.class_dir:
            notes.append(f"{label}'s class_dir is not used without a class prompt.")
    elif c.num_class_images == 0:
        notes.append(f"{label} has num_class_images 0, so prior preservation is off for it.")
    elif cfg.prior_loss_weight == 0:
        notes.append(f"{label}'s class images are not used: prior_loss_weight is 0.")
    return notes


def _run_warnings(cfg: TrainConfig) -> List[str]:
    """Combinations that work but are probably not meant; fixes the one that cannot work."""
    notes = []
    if cfg.cache_text_embeddings and cfg.text_encoder_mode != "frozen":
        cfg.cache_text_embeddings = False
        notes.append(f"cache_text_embeddings turned off: the text encoder is trained ({cfg.text_encoder_mode}).")
    if cfg.save_lora_merged and cfg.train_mode != "lora":
        notes.append("save_lora_merged only applies to LoRA training; full training already writes a checkpoint.")
    if cfg.optimizer == "prodigy" and cfg.unet_learning_rate < 0.1:
        notes.append(f"Prodigy finds its own step size and expects a learning rate near 1.0, not {cfg.unet_learning_rate}.")
    if cfg.lr_warmup_steps >= cfg.max_steps and cfg.lr_scheduler != "constant":
        notes.append(f"lr_warmup_steps ({cfg.lr_warmup_steps}) is not below max_steps ({cfg.max_steps}), "
                     "so the learning rate never reaches its full value.")
    if cfg.family == "sdxl" and cfg.resolution < 1024:
        notes.append(f"SDXL was trained at 1024 pixels; resolution {cfg.resolution} gives weaker results.")
    if cfg.text_encoder_stop_step and cfg.text_encoder_mode == "frozen":
        notes.append("text_encoder_stop_step is ignored: the text encoder is frozen.")
    return notes


def validate(cfg: TrainConfig) -> List[str]:
    """Warnings for a usable config; raises UserError with one sentence for the first hard error.

    Normalises cfg in place (coerced types, cache_text_embeddings off when the text encoder trains).
    Checks the settings only; folders and files are checked by the trainer when it opens them.
    """
    _check_fields(cfg, "")
    if not cfg.checkpoint.strip():
        raise UserError("Setting 'checkpoint' is empty; give the source model (a .safetensors file or a diffusers folder).")
    _check_name(cfg.name)
    cfg.concepts = _coerce(cfg.concepts, List[Concept], "")
    if not cfg.concepts:
        raise UserError("Setting 'concepts' is empty; add a concept (an instance image folder and prompt), "
                        "e.g. with --instance-dir and --instance-prompt.")
    if cfg.init_lora and cfg.train_mode != "lora":
        raise UserError("Setting 'init_lora' needs train_mode 'lora'; to train fully on top of a LoRA, "
                        "merge it into the checkpoint first (save_lora_merged).")
    notes = []
    for i, concept in enumerate(cfg.concepts, 1):
        _check_fields(concept, f" of concept {i}")
        notes += _concept_warnings(cfg, concept, i)
    return notes + _run_warnings(cfg)


# ---------------------------------------------------------------------------------------------
# Command line

_ALIASES = {"max_steps": ["--steps"]}
_CONCEPT_FLAGS = ("instance_dir", "instance_prompt", "class_prompt", "class_dir", "num_class_images",
                  "caption_mode", "instance_token")


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option(group, f: dataclasses.Field, tp: Any, dest: Optional[str] = None) -> None:
    meta = f.metadata
    shown = _default(f)
    help_text = (meta["help"] + f" (default: {shown!r})" if shown not in ("", []) else meta["help"]).replace("%", "%%")
    kwargs: Dict[str, Any] = {"dest": dest or f.name, "default": argparse.SUPPRESS, "help": help_text}
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        kwargs.update(nargs="*", type=item, metavar=_METAVARS[item])
    elif meta["choices"]:
        kwargs.update(type=tp, choices=meta["choices"])
    else:
        kwargs.update(type=tp, metavar=_METAVARS[tp])
    flags = [_flag(f.name)] + _ALIASES.get(f.name, [])
    if dest:
        flags = [_flag(dest.replace("concept_", "", 1))]
    group.add_argument(*flags, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per setting (--max-steps, --no-hflip, ...), grouped as in the tab, plus the single-concept flags."""
    parser.add_argument("--config", default=None, help="JSON config file to start from; flags given here override it.")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    hints = _hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name != "concepts":
            _add_option(groups[f.metadata["group"]], f, hints[f.name])
    groups["training"].add_argument("--lora", dest="train_mode", action="store_const", const="lora",
                                    default=argparse.SUPPRESS, help="Same as --train-mode lora.")
    concept_hints, concept_fields = _hints(Concept), {f.name: f for f in fields(Concept)}
    for name in _CONCEPT_FLAGS:
        _add_option(groups["concepts"], concept_fields[name], concept_hints[name], dest=f"concept_{name}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config first, then each flag given on the command line; single-concept flags set the first concept."""
    data = to_dict(load_config(args.config) if getattr(args, "config", None) else TrainConfig())
    data.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    given = {n: getattr(args, f"concept_{n}") for n in _CONCEPT_FLAGS if hasattr(args, f"concept_{n}")}
    if given:
        if not data["concepts"]:
            data["concepts"] = [dataclasses.asdict(Concept())]
        data["concepts"][0].update(given)
    return _from_dict(TrainConfig, data, "the command line")


# ---------------------------------------------------------------------------------------------
# Recommendations

_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
# Smallest GPU memory (GB) that full UNet training fits in, and below which it needs 8-bit Adam and
# checkpointing: fp32 master weights + grads + Adam states are ~16 bytes per UNet parameter.
_FULL_FITS = {"sd1": 10, "sd2": 10, "sd2-v": 12, "sdxl": 40}
_FULL_ROOMY = {"sd1": 24, "sd2": 24, "sd2-v": 24, "sdxl": 80}
_LORA_ROOMY = {"sd1": 12, "sd2": 12, "sd2-v": 16, "sdxl": 24}


def recommended(family: str, train_mode: str, vram_gb: Optional[float], *, have_bitsandbytes: bool = True) -> Dict[str, Any]:
    """Setting overrides for a family, a training mode and the GPU's memory (None: unknown, no memory trade-offs).

    May switch train_mode to 'lora' when full training cannot fit. Pure: checks nothing on the machine.
    """
    if family not in FAMILIES:
        raise UserError(f"Unknown model family '{family}'; choose one of {', '.join(FAMILIES)}.")
    if train_mode not in ("full", "lora"):
        raise UserError(f"Unknown train mode '{train_mode}'; choose full or lora.")
    fam = "sd1" if family == "auto" else family
    out: Dict[str, Any] = {"train_batch_size": 1, "cache_latents": True, "mixed_precision": "auto", "attention": "auto"}
    if family != "auto":
        out["resolution"] = _RESOLUTION[family]
    if train_mode == "full" and vram_gb is not None and vram_gb < _FULL_FITS[fam]:
        train_mode = "lora"  # full training does not fit: adapters do
    out["train_mode"] = train_mode
    if train_mode == "lora":
        out.update(_lora_overrides(fam, vram_gb))
    else:
        out.update(_full_overrides(fam, vram_gb, have_bitsandbytes))
    return out


def _lora_overrides(fam: str, vram_gb: Optional[float]) -> Dict[str, Any]:
    # LoRA's optimizer states are tiny, so plain AdamW; memory goes to activations instead.
    out = {"optimizer": "adamw", "lora_learning_rate": 1e-4, "lora_rank": 32 if fam == "sdxl" else 16,
           "lora_alpha": 0.0, "text_encoder_mode": "frozen", "cache_text_embeddings": True}
    if vram_gb is not None:
        out["gradient_checkpointing"] = vram_gb < _LORA_ROOMY[fam]
    return out


def _full_overrides(fam: str, vram_gb: Optional[float], have_bitsandbytes: bool) -> Dict[str, Any]:
    out = {"optimizer": "adamw", "learning_rate": 1e-6 if fam == "sdxl" else 2e-6, "text_encoder_mode": "frozen",
           "cache_text_embeddings": True}
    if vram_gb is None:
        return out
    roomy = vram_gb >= _FULL_ROOMY[fam]
    out["gradient_checkpointing"] = not roomy or fam == "sdxl"
    if not roomy:
        out["optimizer"] = "adamw8bit" if have_bitsandbytes else "adafactor"
    elif fam != "sdxl":
        # room to spare: training the text encoder too improves likeness (diffusers' advice for faces)
        out.update(text_encoder_mode="full", text_encoder_lr=1e-6, cache_text_embeddings=False)
    return out
