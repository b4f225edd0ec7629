"""Checking a TrainConfig before any work: one sentence for the first hard error, warnings for the rest.

    cfg, warnings = validate(cfg)   # a normalised copy; the config given is left as it was
"""

import dataclasses
import difflib
import re
from dataclasses import fields
from typing import Any, Dict, List, NamedTuple, Tuple

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.captions import has_filewords, without_filewords
from dreambooth_ext.train.config import Concept, FILEWORDS, TrainConfig, type_hints
from dreambooth_ext.train.config_io import coerce
from dreambooth_ext.train.fused_backward import refusal as fused_refusal

_NAME_BAD_CHARS = '/\\:*?"<>|'
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
_KNOWN_TOKENS = {"sks", "ohwx", "zwx", "mksks", "xyz"}


class Checked(NamedTuple):
    """What validate gives: the normalised copy of the config, and the warnings for the user."""

    config: TrainConfig
    warnings: List[str]


def _checked_fields(obj, where: str):
    """A copy of a TrainConfig or Concept with every field's type coerced, after its range and choices are
    checked; the concepts of a TrainConfig are left to the caller."""
    hints = type_hints(type(obj))
    values = {}
    for f in fields(obj):
        if f.name == "concepts":
            continue
        label = f"'{f.name}'{where}"
        values[f.name] = coerce(getattr(obj, f.name), hints[f.name], label)
        _check_range(values[f.name], f.metadata, label)
    return dataclasses.replace(obj, **values)


def _check_range(value: Any, meta: Dict[str, Any], label: str) -> None:
    low, high, choices, step = meta["min"], meta["max"], meta["choices"], meta["multiple_of"]
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"Setting {label} is '{value}'; choose one of {', '.join(choices)}{hint}.")
    if low is not None and value < low:
        raise UserError(f"Setting {label} is {_shown(value)}; it must be at least {low}.")
    if high is not None and value > high:
        raise UserError(f"Setting {label} is {_shown(value)}; it must be at most {high}.")
    if step and value % step:
        raise UserError(f"Setting {label} is {value}; it must be a multiple of {step} (e.g. {round(value / step) * step}).")


def _shown(value: Any) -> str:
    """A value for a message; an integer of thousands of digits cannot even be printed."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    return str(value)


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
    return re.findall(r"[\w]+", without_filewords(text).lower())


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
    if c.caption_mode == "filewords" and not has_filewords(c.instance_prompt):
        notes.append(f"{label} uses caption_mode 'filewords' but its instance prompt has no {FILEWORDS}, "
                     "so the captions are not used.")
    if c.caption_mode == "prompt" and has_filewords(c.instance_prompt):
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


def _run_warnings(cfg: TrainConfig) -> Tuple[TrainConfig, List[str]]:
    """Combinations that work but are probably not meant; a copy that fixes the one that cannot work."""
    notes = []
    if cfg.cache_text_embeddings and cfg.text_encoder_mode != "frozen":
        cfg = dataclasses.replace(cfg, cache_text_embeddings=False)
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
    return cfg, notes


def validate(cfg: TrainConfig) -> Checked:
    """(normalised copy, warnings) for a usable config; raises UserError with one sentence for the first hard error.

    The copy has every type coerced, the concepts as Concept objects and cache_text_embeddings off when the
    text encoder trains; `cfg` itself is not changed. Checks the settings only; folders and files are checked
    by the trainer when it opens them.
    """
    cfg = _checked_fields(cfg, "")
    if not cfg.checkpoint.strip():
        raise UserError("Setting 'checkpoint' is empty; give the source model (a .safetensors file or a diffusers folder).")
    _check_name(cfg.name)
    concepts = coerce(cfg.concepts, List[Concept], "")
    if not concepts:
        raise UserError("Setting 'concepts' is empty; add a concept (an instance image folder and prompt), "
                        "e.g. with --instance-dir and --instance-prompt.")
    if cfg.init_lora and cfg.train_mode != "lora":
        raise UserError("Setting 'init_lora' needs train_mode 'lora'; to train fully on top of a LoRA, "
                        "merge it into the checkpoint first (save_lora_merged).")
    if cfg.fused_backward_pass:  # what the settings alone rule out; the run checks the resolved precision
        why = fused_refusal(accumulation=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
                            optimizer=cfg.optimizer)
        if why:
            raise UserError(why)
    notes = []
    for i, concept in enumerate(concepts, 1):
        concepts[i - 1] = _checked_fields(concept, f" of concept {i}")
        notes += _concept_warnings(cfg, concepts[i - 1], i)
    cfg, run_notes = _run_warnings(dataclasses.replace(cfg, concepts=concepts))
    return Checked(cfg, notes + run_notes)
