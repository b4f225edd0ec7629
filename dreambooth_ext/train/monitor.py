"""The training monitor: at each sample step, how close the concept is and how far the class has drifted.

Two figures per measurement, both on fixed seeds so steps compare like for like:

- fidelity: mean distance from the instance prompt's generations to the nearest instance image
  (scaled latents; lower is closer to the subject);
- class drift: mean distance from the class prompt's generations to the base model's own
  generations for the same seeds (0 = the class is drawn exactly as before training).

Both are also given as a share of the base's distance from its instance-prompt generations to the
instance images, so they read the same on any model: fidelity 1.0 = no closer than the base,
drift 0.5 = the class has moved half as far as the whole concept is away.
The run's figures are kept in the workspace as monitor.json; `best_step` names the step with the
best fidelity before drift passes DRIFT_LIMIT (the seeds warn how quickly DreamBooth overfits).
"""

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from dreambooth_ext.atomic import write_text

DRIFT_LIMIT = 0.5
SEEDS = (9001, 9002, 9003, 9004)
FILE = "monitor.json"


@dataclass
class Point:
    step: int
    fidelity: float  # share of the base's distance to the instances (lower is better)
    drift: float  # class drift as a share of the same distance
    fidelity_latent: float  # raw distances, in scaled latent units
    drift_latent: float


@dataclass
class MonitorRecord:
    instance_prompt: str
    class_prompt: str
    seeds: List[int]
    base_distance: float
    drift_limit: float = DRIFT_LIMIT
    points: List[Point] = field(default_factory=list)

    def best_step(self) -> Optional[int]:
        """The measured step with the best fidelity whose drift is within the limit (None: none is)."""
        ok = [p for p in self.points if p.drift <= self.drift_limit]
        return min(ok, key=lambda p: (p.fidelity, p.step)).step if ok else None


def _generate(bundle, unet, text_encoders, prompt: str, seeds, steps: int, guidance: float, resolution: int,
              autocast=contextlib.nullcontext):
    from dreambooth_ext.evaluate import generated_latents
    from dreambooth_ext.train.inference import eval_mode, pipeline_modules
    from dreambooth_ext.train.models import make_pipeline

    pipe = make_pipeline(bundle, unet=unet, text_encoders=text_encoders)
    # autocast: a fp32 trained UNet beside half-precision frozen parts, as for samples
    with eval_mode(pipeline_modules(pipe)), autocast():
        return generated_latents(pipe, prompt, seeds, steps, resolution, guidance)


class Monitor:
    """Made before the first step (the modules still hold the base weights), measured at sample steps."""

    def __init__(self, cfg, bundle, unet, text_encoders, workspace: Path, autocast=contextlib.nullcontext):
        from dreambooth_ext.evaluate import image_latents, mean_nearest_distance
        from dreambooth_ext.train.captions import build_prompt
        from dreambooth_ext.train.images import list_images

        concept = cfg.concepts[0]
        self.path = Path(workspace) / FILE
        self.steps, self.guidance, self.res = cfg.sample_steps, cfg.sample_guidance, cfg.resolution
        self.bundle, self.unet, self.tes, self.autocast = bundle, unet, text_encoders, autocast
        instance_prompt = build_prompt(concept.instance_prompt, None, "filewords")
        class_prompt = (concept.class_prompt or "").strip()
        self.instances = image_latents(bundle, list_images(Path(concept.instance_dir))[0], cfg.resolution)
        base_token = self._latents(instance_prompt)
        self.base_class = self._latents(class_prompt) if class_prompt else None
        base = mean_nearest_distance(base_token, self.instances)
        self.record = MonitorRecord(instance_prompt, class_prompt, list(SEEDS), base)

    def _latents(self, prompt: str) -> torch.Tensor:
        return _generate(self.bundle, self.unet, self.tes, prompt, SEEDS, self.steps, self.guidance, self.res,
                         self.autocast)

    def measure(self, step: int) -> Point:
        from dreambooth_ext.evaluate import mean_nearest_distance, paired_distance

        fid = mean_nearest_distance(self._latents(self.record.instance_prompt), self.instances)
        drift = 0.0
        if self.base_class is not None:
            drift = paired_distance(self._latents(self.record.class_prompt), self.base_class)
        base = self.record.base_distance or 1.0
        point = Point(step, fid / base, drift / base, fid, drift)
        self.record.points = [p for p in self.record.points if p.step != step] + [point]
        self.save()
        return point

    def save(self):
        write_text(self.path, json.dumps(asdict(self.record), indent=1))


def describe(point: Point) -> str:
    return (f"monitor at step {point.step}: fidelity {point.fidelity:.2f} (distance to the instance images, "
            f"1 = the base's), class drift {point.drift:.2f} (0 = the base's class pictures)")


def closing_note(record: MonitorRecord) -> str:
    best = record.best_step()
    if best is None:
        return (f"monitor: class drift passed {record.drift_limit} at every measured step; "
                "lower the learning rate or the steps, or raise prior preservation")
    return (f"monitor: best step {best} (closest to the instance images while class drift stays under "
            f"{record.drift_limit}); figures in {FILE} in the workspace")


def read_record(workspace: Path) -> Optional[MonitorRecord]:
    path = Path(workspace) / FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    raw["points"] = [Point(**p) for p in raw.get("points", [])]
    return MonitorRecord(**raw)
