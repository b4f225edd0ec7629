"""Epochs as well as steps: one epoch shows every instance image once.

A step takes train_batch_size images times gradient_accumulation_steps (times the processes of a
data-parallel run); batches hold images of one bucket, so an epoch may have a few more batches than
images / batch size. With max_epochs set, the run's step count is max_epochs epochs of steps.
"""

import dataclasses
import math
import os
from typing import Tuple

from dreambooth_ext.train.config import TrainConfig


def _processes() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))  # set by `accelerate launch`
    except ValueError:
        return 1


def steps_per_epoch(cfg: TrainConfig) -> Tuple[int, int]:
    """(instance images, optimizer steps per epoch) for these settings; UserError for an unusable folder."""
    from dreambooth_ext.train.dataset import build_examples

    instances, _ = build_examples(dataclasses.replace(cfg, prior_loss_weight=0.0), lambda _m: None)
    batches = len(instances._epoch_order(0)) if len(instances) else 0
    return len(instances), max(1, math.ceil(batches / (cfg.gradient_accumulation_steps * _processes())))


def resolve_max_steps(cfg: TrainConfig) -> TrainConfig:
    """cfg with max_steps = max_epochs epochs when max_epochs is set (cfg itself otherwise)."""
    if cfg.max_epochs <= 0:
        return cfg
    _, per_epoch = steps_per_epoch(cfg)
    return dataclasses.replace(cfg, max_steps=cfg.max_epochs * per_epoch)


def epoch_note(cfg: TrainConfig) -> str:
    """The tab's line: the image count, steps per epoch, and the run's length in both units."""
    images, per_epoch = steps_per_epoch(cfg)
    if not images:
        return ""
    head = f"{images} instance images, batch {cfg.train_batch_size}"
    if cfg.gradient_accumulation_steps > 1:
        head += f" x {cfg.gradient_accumulation_steps} accumulated"
    if cfg.max_epochs > 0:
        return f"{head}: one epoch = {per_epoch} steps; {cfg.max_epochs} epochs = {cfg.max_epochs * per_epoch} steps."
    return f"{head}: one epoch = {per_epoch} steps; {cfg.max_steps} steps = {cfg.max_steps / per_epoch:.1f} epochs."
