"""Writing what a run made where the WebUI looks: checkpoints in Stable-diffusion/, LoRAs in Lora/."""

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from dreambooth_ext.bridge import checkpoint_suffix
from dreambooth_ext.bridge.components import text_encoder_name
from dreambooth_ext.dtypes import DTYPES
from dreambooth_ext.train import lora as lora_lib


def merged_state_dict(model: torch.nn.Module, base: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The model's plain state dict with every LoRA adapter added into its base weight (the model is untouched).

    `base`: the component's weights as stored in the base folder. On a GPU the frozen weights in
    memory are half precision; the merge starts from the stored full-precision ones instead, so
    every weight no adapter touches is written exactly as the base has it.
    """
    weights = lora_lib.get_lora_weights(model)
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = base[key] if base is not None and key in base else value
    for path, w in weights.items():
        key = f"{path}.weight"
        out[key] = out[key].float() + lora_lib.lora_delta(w).float().reshape(out[key].shape)
    return out


def plain_state_dict(model: torch.nn.Module, component: str,
                     base_weights: Callable[[str], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The model's weights, LoRA merged in; `base_weights(component)` (ModelBundle.base_state_dict): the
    stored weights a merge starts from."""
    if not lora_lib.lora_layers(model):
        return model.state_dict()
    return merged_state_dict(model, base_weights(component))


def training_metadata(cfg, step: int, bundle) -> Dict[str, str]:
    concepts = [{"instance_prompt": c.instance_prompt, "class_prompt": c.class_prompt,
                 "images": c.instance_dir} for c in cfg.concepts]
    return {
        "dreambooth_ext.base_checkpoint": Path(cfg.checkpoint).name,
        "dreambooth_ext.steps": str(step),
        "dreambooth_ext.concepts": json.dumps(concepts),
        "dreambooth_ext.settings": json.dumps({
            "train_mode": cfg.train_mode, "resolution": cfg.resolution, "learning_rate": cfg.unet_learning_rate,
            "text_encoder_mode": cfg.text_encoder_mode, "prior_loss_weight": cfg.prior_loss_weight,
            "optimizer": cfg.optimizer, "lr_scheduler": cfg.lr_scheduler, "batch_size": cfg.train_batch_size,
            "lora_rank": cfg.lora_rank if cfg.train_mode == "lora" else None, "seed": cfg.seed,
        }),
    }


def lora_file_metadata(cfg, step: int, bundle, path: Path) -> Dict[str, str]:
    """The LoRA's own keys, the model spec and kohya's ss_* training keys, which the WebUI's cards read."""
    from dreambooth_ext.train.model_metadata import kohya_lora, modelspec

    return {**training_metadata(cfg, step, bundle), **modelspec(cfg, bundle.family, step, lora=True),
            **kohya_lora(cfg, bundle.family, step, Path(path).stem)}


def write_checkpoint(cfg, bundle, trainables, step: int, path: Path) -> Path:
    """A single file in the WebUI's layout: the base's untrained parts plus the trained modules."""
    replace = {"unet": plain_state_dict(trainables.unet, component="unet", base_weights=bundle.base_state_dict)}
    if trainables.te_trained:
        for i, te in enumerate(trainables.text_encoders):
            name = text_encoder_name(i)
            replace[name] = plain_state_dict(te, component=name, base_weights=bundle.base_state_dict)
    from dreambooth_ext.train.model_metadata import modelspec

    metadata = {**training_metadata(cfg, step, bundle), **modelspec(cfg, bundle.family, step, lora=False)}
    report = bundle.write_single_file(path, dtype=cfg.save_dtype, keep_ema=False, metadata=metadata,
                                      replace=replace, progress=lambda _m: None)
    return Path(report.path)


def write_outputs(cfg, bundle, trainables, step: int, reporter) -> List[Path]:
    """Everything a save writes: the LoRA and/or the checkpoint, named NAME_<step>."""
    from dreambooth_ext.train.lora_export import export_webui_lora
    from dreambooth_ext.train.model_metadata import write_card
    from dreambooth_ext.train.owned_files import guard, record_written

    written = []
    if trainables.unet_lora:
        path = cfg.lora_path() / f"{cfg.name}_{step}.safetensors"
        guard(cfg, path)
        tes = trainables.text_encoders if trainables.te_mode == "lora" else []
        export_webui_lora(trainables.unet, tes, path, bundle.family, lora_file_metadata(cfg, step, bundle, path),
                          dtype=DTYPES[cfg.save_dtype])
        record_written(cfg, path)
        reporter.output(str(path), "lora")
        written.append(path)
        card = write_card(cfg, bundle.family, path)  # the WebUI card's activation text: the instance tokens
        if card is not None:
            record_written(cfg, card)
    # a fully trained text encoder does not fit in a LoRA file: it needs the checkpoint too
    if not trainables.unet_lora or cfg.save_lora_merged or trainables.te_mode == "full":
        target = cfg.checkpoint_path() / f"{cfg.name}_{step}{checkpoint_suffix(cfg.save_format)}"
        guard(cfg, target)
        guard(cfg, target.with_suffix(".yaml"))
        path = write_checkpoint(cfg, bundle, trainables, step, target)
        record_written(cfg, path)
        reporter.output(str(path), "checkpoint")
        written.append(path)
        if path.with_suffix(".yaml").is_file():
            record_written(cfg, path.with_suffix(".yaml"))
            reporter.output(str(path.with_suffix(".yaml")), "yaml")
    return written
