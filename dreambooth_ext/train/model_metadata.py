"""What a trained file says about itself: SAI model-spec keys, kohya's ss_* keys, and the LoRA card.

The WebUI's Lora extension reads `ss_output_name` (the card's name), `ss_base_model_version` /
`ss_v2` (which models it fits) and `ss_tag_frequency` (the card's tags); its card editor keeps the
user's own fields - "activation text" (added to the prompt with the LoRA), "preferred weight",
"sd version", "description", "notes" - in NAME.json beside the file. Civitai-style tools read the
`modelspec.*` keys (title, architecture, resolution, trigger phrase, date).
"""

import datetime
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from dreambooth_ext.atomic import create_new
from dreambooth_ext.bridge.to_single import ARCHITECTURES

SPEC_VERSION = "1.0.0"
CARD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sd2-v": "SD2", "sdxl": "SDXL"}


def trigger_words(cfg) -> List[str]:
    """Each concept's token: its instance_token, else the rare words its prompt has and its class prompt lacks."""
    from dreambooth_ext.train.config_checks import _looks_rare, _words

    found = []
    for c in cfg.concepts:
        if c.instance_token.strip():
            found.append(c.instance_token.strip())
            continue
        class_words = set(_words(c.class_prompt))
        found += [w for w in _words(c.instance_prompt) if w not in class_words and _looks_rare(w)]
    return list(dict.fromkeys(found))


def modelspec(cfg, family: str, step: int, lora: bool, now: Optional[datetime.datetime] = None) -> Dict[str, str]:
    now = now or datetime.datetime.now()
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": ARCHITECTURES[family] + ("/lora" if lora else ""),
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if family == "sdxl" or not lora else "diffusers"),
        "modelspec.title": f"{cfg.name} (step {step})",
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": now.replace(microsecond=0).isoformat(),
        "modelspec.description": f"DreamBooth {'LoRA' if lora else 'checkpoint'} trained on "
                                 f"{Path(cfg.checkpoint).name} for {step} steps.",
    }
    if lora:  # a checkpoint has the bridge's own prediction_type key (diffusers' words)
        meta["modelspec.prediction_type"] = "v" if family == "sd2-v" else "epsilon"
    words = trigger_words(cfg)
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
        meta["modelspec.usage_hint"] = f"Put {', '.join(words)} in the prompt."
    if family == "sd1" and cfg.clip_skip > 1:
        meta["modelspec.encoder_layer"] = str(cfg.clip_skip)
    return meta


def tag_frequency(cfg) -> Dict[str, Dict[str, int]]:
    """Per instance folder, how often each comma-separated tag of its training prompts occurs (kohya's form)."""
    from dreambooth_ext.train.captions import prompt_for_image
    from dreambooth_ext.train.images import list_images

    out: Dict[str, Dict[str, int]] = {}
    for c in cfg.concepts:
        counts: Counter = Counter()
        try:
            images, _ = list_images(c.instance_dir)
        except Exception:  # the folder went away since training began: no tags, not a failed save
            images = []
        for image in images:
            try:
                prompt = prompt_for_image(image, c.instance_prompt, c.caption_mode)
            except Exception:
                continue
            counts.update(t.strip() for t in prompt.split(",") if t.strip())
        key = Path(c.instance_dir).name or str(c.instance_dir)
        out.setdefault(key, {})
        for tag, n in counts.items():
            out[key][tag] = out[key].get(tag, 0) + n
    return out


def kohya_lora(cfg, family: str, step: int, output_name: str, images: Optional[int] = None) -> Dict[str, str]:
    """The ss_* training keys kohya's scripts write, from this run's settings (the network keys come from
    lora_export, which reads them off the tensors)."""
    tags = tag_frequency(cfg)
    dirs = {Path(c.instance_dir).name or str(c.instance_dir): {"n_repeats": 1, "img_count": _image_count_of(c.instance_dir)}
            for c in cfg.concepts}
    count = images if images is not None else sum(d["img_count"] for d in dirs.values())
    words = trigger_words(cfg)
    return {
        "ss_output_name": output_name,
        "ss_sd_model_name": Path(cfg.checkpoint).name,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_tag_frequency": json.dumps(tags),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_num_train_images": str(count),
        "ss_num_reg_images": str(sum(c.num_class_images for c in cfg.concepts if c.class_prompt.strip())),
        "ss_max_train_steps": str(cfg.max_steps),
        "ss_steps": str(step),
        "ss_learning_rate": str(cfg.unet_learning_rate),
        "ss_unet_lr": str(cfg.unet_learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_learning_rate if cfg.text_encoder_mode == "lora" else 0.0),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": cfg.optimizer,
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_total_batch_size": str(cfg.train_batch_size * cfg.gradient_accumulation_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_clip_skip": str(cfg.clip_skip) if family == "sd1" else "None",
        "ss_seed": str(cfg.seed),
        "ss_shuffle_caption": str(cfg.shuffle_tags),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_noise_offset": str(cfg.offset_noise) if cfg.offset_noise else "None",
        "ss_min_snr_gamma": str(cfg.min_snr_gamma) if cfg.min_snr_gamma else "None",
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_max_token_length": str(cfg.max_prompt_tokens),
        "ss_training_comment": (f"DreamBooth for the WebUI; trigger words: {', '.join(words)}" if words
                                else "DreamBooth for the WebUI"),
    }


def _image_count_of(folder: str) -> int:
    from dreambooth_ext.train.images import list_images

    try:
        return len(list_images(folder)[0])
    except Exception:
        return 0


def card_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def write_card(cfg, family: str, model_path: Path) -> Optional[Path]:
    """NAME.json beside a LoRA, as the WebUI's card editor writes it, with the tokens as its activation text.

    Never over a file already there (the user's own card, or another tool's json): None then."""
    path = card_path(model_path)
    if path.exists() or path.is_symlink():
        return None
    words = trigger_words(cfg)
    card = {
        "description": f"DreamBooth LoRA of {', '.join(words) or cfg.name}, trained on {Path(cfg.checkpoint).name}.",
        "sd version": CARD_VERSIONS[family],
        "activation text": ", ".join(words),
        "preferred weight": 0,
        "notes": "",
    }
    # a file that appeared meanwhile is theirs, and kept
    return path if create_new(path, json.dumps(card, indent=4) + "\n", "the card file") else None

