"""The training monitor: at each sample step, how close the concept is and how far the class has drifted.

Two figures per measurement, both on fixed seeds so steps compare like for like:

- fidelity: mean distance from the instance prompt's generations to the nearest instance image
  (scaled latents; lower is closer to the subject);
- class drift: mean distance from the class prompt's generations to the base model's own
  generations for the same seeds (0 = the class is drawn exactly as before training).

Both are also given as a share of the base's distance from its instance-prompt generations to the
instance images, so they read the same on any model: fidelity 1.0 = no closer than the base,
drift 0.5 = the class has moved half as far as the whole concept is away.

With a CLIP model on disk (setting `monitor_clip_model`, see monitor_clip.py) each measurement also
has the DreamBooth paper's scores, from the decoded generations: CLIP-I (instance generations to the
instance images, higher is closer), CLIP-T (instance generations to the instance prompt without its
token) and the class's CLIP-I to the base's class generations for the same seeds (1 = unchanged).
The latent figures are measured either way.

The best step: among the measured steps whose (latent) class drift is at most DRIFT_LIMIT, the one
with the highest CLIP-I when every such step has one, else the one with the lowest latent fidelity;
the earlier step on a tie; none when every step has drifted past the limit (the seeds warn how
quickly DreamBooth overfits). The drift limit stays on the latent share because that share is
calibrated by the run's own base distance; the CLIP class similarity is reported beside it.
The run's figures are kept in the workspace as monitor.json (a resumed run keeps the figures of the
steps before its saved state); the lines the monitor hands the reporter are `MonitorLine`s that carry
the measured point or the whole record, so a job (the tab's plot) takes the figures without parsing text.
"""

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from dreambooth_ext.atomic import write_text
from dreambooth_ext.train.conditioning import TextOptions

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
    clip_i: Optional[float] = None  # CLIP scores, with a CLIP model (see the module docstring)
    clip_t: Optional[float] = None
    class_clip_i: Optional[float] = None


def best_of(points: Sequence[Point], drift_limit: float = DRIFT_LIMIT) -> Optional[int]:
    """The step the module docstring's rule picks; None when every point has drifted past the limit."""
    ok = [p for p in points if p.drift <= drift_limit]
    if not ok:
        return None
    if all(p.clip_i is not None for p in ok):
        return min(ok, key=lambda p: (-p.clip_i, p.step)).step
    return min(ok, key=lambda p: (p.fidelity, p.step)).step


@dataclass
class MonitorRecord:
    instance_prompt: str
    class_prompt: str
    seeds: List[int]
    base_distance: float
    drift_limit: float = DRIFT_LIMIT
    points: List[Point] = field(default_factory=list)
    clip_model: str = ""  # the CLIP folder the scores come from ("" = latent figures only)
    clip_text: str = ""  # the text CLIP-T compares with
    base_clip_i: Optional[float] = None  # the base model's own CLIP-I and CLIP-T, for reference
    base_clip_t: Optional[float] = None
    name: str = ""  # the run's name and model saving, so the closing note can name the file to take
    save_model_every: int = 0
    max_steps: int = 0

    def best_step(self) -> Optional[int]:
        """The measured step the module docstring's rule picks (None: every step drifted past the limit)."""
        return best_of(self.points, self.drift_limit)


class MonitorLine(str):
    """A line of the monitor for the reporter's stage; `point` or `record` is what it tells of."""

    point: Optional[Point] = None
    record: Optional[MonitorRecord] = None

    @classmethod
    def of(cls, text: str, point: Optional[Point] = None, record: Optional[MonitorRecord] = None) -> "MonitorLine":
        line = cls(text)
        line.point, line.record = point, record
        return line


def _generate(bundle, unet, text_encoders, prompt: str, seeds, steps: int, guidance: float, resolution: int,
              autocast=contextlib.nullcontext, text=None):
    from dreambooth_ext.evaluate import generated_latents
    from dreambooth_ext.train.inference import eval_mode, pipeline_modules
    from dreambooth_ext.train.models import make_pipeline

    pipe = make_pipeline(bundle, unet=unet, text_encoders=text_encoders)
    # autocast: a fp32 trained UNet beside half-precision frozen parts, as for samples
    with eval_mode(pipeline_modules(pipe)), autocast():
        return generated_latents(pipe, prompt, seeds, steps, resolution, guidance, text)


class Monitor:
    """Made before the first step (the modules still hold the base weights), measured at sample steps."""

    def __init__(self, cfg, bundle, unet, text_encoders, workspace: Path, autocast=contextlib.nullcontext):
        from dreambooth_ext.evaluate import image_latents, mean_nearest_distance
        from dreambooth_ext.train.captions import build_prompt
        from dreambooth_ext.train.images import list_images, load_image

        concept = cfg.concepts[0]
        self.path = Path(workspace) / FILE
        self.steps, self.guidance, self.res = cfg.sample_steps, cfg.sample_guidance, cfg.resolution
        self.bundle, self.unet, self.tes, self.autocast = bundle, unet, text_encoders, autocast
        self.text = TextOptions.from_config(cfg, bundle.family)  # prompts read as the samples read them
        instance_prompt = build_prompt(concept.instance_prompt, None, "filewords")
        class_prompt = (concept.class_prompt or "").strip()
        files = list_images(Path(concept.instance_dir))[0]
        self.instances = image_latents(bundle, files, cfg.resolution)
        base_token = self._latents(instance_prompt)
        self.base_class = self._latents(class_prompt) if class_prompt else None
        base = mean_nearest_distance(base_token, self.instances)
        self.record = MonitorRecord(instance_prompt, class_prompt, list(SEEDS), base, name=cfg.name,
                                    save_model_every=cfg.save_model_every, max_steps=cfg.max_steps)
        self.clip = None
        if getattr(cfg, "monitor_clip_model", ""):
            from dreambooth_ext.train.monitor_clip import ClipScorer, mean_pairwise, text_without_token

            self.clip = ClipScorer(cfg.monitor_clip_model, next(unet.parameters()).device)
            self.record.clip_model = str(cfg.monitor_clip_model)
            self.record.clip_text = text_without_token(instance_prompt, class_prompt, concept.instance_token)
            with self.clip.on_device():
                self.clip_instances = self.clip.images([load_image(f) for f in files])
                self.clip_text = self.clip.texts([self.record.clip_text])
                self.clip_base_class = self._embedded(self.base_class) if class_prompt else None
                token = self._embedded(base_token)
            self.record.base_clip_i = mean_pairwise(token, self.clip_instances)
            self.record.base_clip_t = mean_pairwise(token, self.clip_text)
        self.record.points = _earlier_points(self.record, Path(workspace))
        self.save()

    def _latents(self, prompt: str) -> "torch.Tensor":  # noqa: F821
        return _generate(self.bundle, self.unet, self.tes, prompt, SEEDS, self.steps, self.guidance, self.res,
                         self.autocast, self.text)

    def _embedded(self, latents) -> "torch.Tensor":  # noqa: F821
        """CLIP image embeddings of generations, decoded by the bundle's VAE."""
        from dreambooth_ext.evaluate import decoded_images

        with self.autocast():
            pictures = decoded_images(self.bundle, latents)
        return self.clip.images(pictures)

    def measure(self, step: int) -> Point:
        from dreambooth_ext.evaluate import mean_nearest_distance, paired_distance

        token = self._latents(self.record.instance_prompt)
        fid = mean_nearest_distance(token, self.instances)
        drift, klass = 0.0, None
        if self.base_class is not None:
            klass = self._latents(self.record.class_prompt)
            drift = paired_distance(klass, self.base_class)
        base = self.record.base_distance or 1.0
        point = Point(step, fid / base, drift / base, fid, drift)
        if self.clip is not None:
            from dreambooth_ext.train.monitor_clip import mean_paired, mean_pairwise

            with self.clip.on_device():
                seen = self._embedded(token)
                point.clip_i = mean_pairwise(seen, self.clip_instances)
                point.clip_t = mean_pairwise(seen, self.clip_text)
                if klass is not None:
                    point.class_clip_i = mean_paired(self._embedded(klass), self.clip_base_class)
        # a measurement replaces the step's and any later one's (those of a run resumed from an earlier state)
        self.record.points = [p for p in self.record.points if p.step < step] + [point]
        self.save()
        return point

    def save(self):
        write_text(self.path, json.dumps(asdict(self.record), indent=1))


def _earlier_points(record: MonitorRecord, workspace: Path) -> List[Point]:
    """A resumed run's figures up to its saved step, from the monitor.json it left (same prompts, seeds and
    CLIP model); none for a run that starts afresh."""
    from dreambooth_ext.errors import UserError
    from dreambooth_ext.train.state import read_progress

    try:
        saved, kept = read_progress(workspace), read_record(workspace)
    except (UserError, OSError, ValueError, TypeError, KeyError):
        return []
    if saved is None or kept is None:
        return []
    same = (kept.instance_prompt, kept.class_prompt, kept.seeds, kept.clip_model) == \
        (record.instance_prompt, record.class_prompt, record.seeds, record.clip_model)
    return [p for p in kept.points if p.step <= saved.step] if same else []


def describe(point: Point) -> str:
    text = (f"monitor at step {point.step}: fidelity {point.fidelity:.2f} (distance to the instance images, "
            f"1 = the base's), class drift {point.drift:.2f} (0 = the base's class pictures)")
    if point.clip_i is not None:
        text += f"; CLIP-I {point.clip_i:.3f}, CLIP-T {point.clip_t:.3f}"
        if point.class_clip_i is not None:
            text += f", class CLIP-I {point.class_clip_i:.3f} (1 = the base's class pictures)"
    return MonitorLine.of(text, point=point)


def closing_note(record: MonitorRecord) -> str:
    kept = MonitorRecord(**{**record.__dict__, "points": list(record.points)})  # as it is now, for the job
    best = record.best_step()
    if best is None:
        return MonitorLine.of(f"monitor: class drift passed {record.drift_limit} at every measured step; "
                              "lower the learning rate or the steps, or raise prior preservation", record=kept)
    point = next(p for p in record.points if p.step == best)
    if point.clip_i is not None and all(p.clip_i is not None for p in record.points if p.drift <= record.drift_limit):
        why = f"highest CLIP-I to the instance images, {point.clip_i:.3f}"
        if record.base_clip_i is not None:
            why += f" against the base's {record.base_clip_i:.3f}"
    else:
        why = "closest to the instance images"
    return MonitorLine.of(f"monitor: best step {best} ({why}, while class drift stays under {record.drift_limit})"
                          f"{_model_file(record, best)}; figures in {FILE} in the workspace", record=kept)


def _model_file(record: MonitorRecord, step: int) -> str:
    """Which saved model holds the best step, or how to have one next time."""
    if not record.name:
        return ""
    if step == record.max_steps or (record.save_model_every and step % record.save_model_every == 0):
        return f"; its model is {record.name}_{step}"
    every = f"save_model_every is {record.save_model_every}" if record.save_model_every else "only the last is"
    return (f"; no model was saved at that step ({every}; set save_model_every equal to sample_every to keep one "
            "for each measured step)")


def read_record(workspace: Path) -> Optional[MonitorRecord]:
    path = Path(workspace) / FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    raw["points"] = [Point(**p) for p in raw.get("points", [])]
    return MonitorRecord(**raw)
