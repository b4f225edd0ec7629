"""Training examples: which image, which prompt, which bucket; and the latents and embeddings behind them.

Everything random here is a function of (seed, micro-batch index), not of a running RNG, so a
resumed run draws exactly the batches, crops, flips and noise an uninterrupted one would.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dreambooth_ext.train import buckets as bk
from dreambooth_ext.train.captions import prompt_for_image
from dreambooth_ext.train.derived import derived_seed
from dreambooth_ext.train.images import check_instance_folder, load_image, scan_folder
from dreambooth_ext.vae_io import vae_input


@dataclass
class Example:
    path: Path
    prompt: str
    size: Tuple[int, int]  # the image's upright (w, h)
    bucket: Tuple[int, int]  # the (w, h) it is trained at


@dataclass
class ExampleSet:
    """Instance or class examples, with the deterministic batch order over them."""

    examples: List[Example]
    batch_size: int
    seed: int
    _orders: Dict[int, List[List[int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, index: int) -> List[int]:
        """Example indices of the index-th batch: epochs of bucket-homogeneous batches, reshuffled each epoch."""
        per_epoch = len(self._epoch_order(0))
        epoch, pos = divmod(index, per_epoch)
        return self._epoch_order(epoch)[pos]

    def _epoch_order(self, epoch: int) -> List[List[int]]:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = bk.group_by_bucket([e.bucket for e in self.examples], self.batch_size, self.seed, epoch)
        return self._orders[epoch]


def _bucket_for(size, cfg, bucket_list) -> Tuple[int, int]:
    if not cfg.bucketing:
        return (cfg.resolution, cfg.resolution)
    return bk.assign_bucket(size[0], size[1], bucket_list, upscale=cfg.bucket_upscale, step=cfg.bucket_step)


def build_examples(cfg, warn: Callable[[str], None],
                   should_stop: Optional[Callable[[], bool]] = None) -> Tuple[ExampleSet, ExampleSet]:
    """(instance examples, class examples) for a config; class examples only where prior preservation is on.

    A stop asked for between concepts raises Cancelled.
    """
    from dreambooth_ext.errors import Cancelled

    bucket_list = bk.make_buckets(cfg.resolution, step=cfg.bucket_step) if cfg.bucketing else []
    instance, klass = [], []
    for i, concept in enumerate(cfg.concepts):
        if should_stop is not None and should_stop():
            raise Cancelled()
        paths = check_instance_folder(concept.instance_dir, min_side=cfg.resolution,
                                      label=f"instance image folder of concept {i + 1}", warn=warn)
        sizes = dict(scan_folder(concept.instance_dir)[0])
        for path in paths:
            prompt = prompt_for_image(path, concept.instance_prompt, concept.caption_mode)
            instance.append(Example(path, prompt, sizes[path], _bucket_for(sizes[path], cfg, bucket_list)))
        if cfg.prior_loss_weight > 0 and concept.class_prompt and concept.num_class_images > 0:
            good, _ = scan_folder(cfg.class_path(concept))
            for path, size in good[: concept.num_class_images]:
                klass.append(Example(path, concept.class_prompt, size, _bucket_for(size, cfg, bucket_list)))
    return (ExampleSet(instance, cfg.train_batch_size, cfg.seed),
            ExampleSet(klass, cfg.train_batch_size, derived_seed(cfg.seed, "class")))


@dataclass
class View:
    """How one example is shown at one micro-batch: its crop and flip."""

    crop_tl: Tuple[int, int]  # (top, left), for SDXL's conditioning
    flip: bool


def choose_view(example: Example, cfg, micro_index: int, slot: int) -> View:
    """The crop and flip of an example at one micro-batch.

    With cached latents the crop is drawn once per image (the cache holds one crop, both flips);
    without, each micro-batch draws its own. The flip is drawn per micro-batch either way.
    """
    crop_key = (cfg.seed, "crop", str(example.path)) if cfg.cache_latents else (cfg.seed, "crop", micro_index, slot)
    _, (left, top) = bk.crop_plan(example.size[0], example.size[1], example.bucket, cfg.center_crop,
                                  random.Random(derived_seed(*crop_key)))
    return View((top, left), flip_at(cfg, micro_index, slot))


def flip_at(cfg, micro_index: int, slot: int) -> bool:
    """Whether the image in `slot` of micro-batch `micro_index` is shown mirrored."""
    return cfg.hflip and random.Random(derived_seed(cfg.seed, "flip", micro_index, slot)).random() < 0.5


def pixels(example: Example, view: View, cfg) -> torch.Tensor:
    """The example as a [3, H, W] tensor in [-1, 1], cropped and flipped as the view says."""
    img = load_image(example.path)
    (rw, rh), _ = bk.crop_plan(img.width, img.height, example.bucket, True, None)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), bk.Image.LANCZOS)
    top, left = view.crop_tl
    img = img.crop((left, top, left + example.bucket[0], top + example.bucket[1]))
    t = bk.to_tensor(img)
    return bk.hflip(t) if view.flip else t


class LatentSource:
    """Latent distributions (mean, std) of examples: cached once (in memory, and on disk when given a
    DiskCache), or encoded on demand."""

    # Images per VAE call while caching: one. The VAE's full-resolution activations grow with the call
    # (on an H200, the training monitor's start, which encoded 6 pictures at 1024 px in one call,
    # peaked at 15.8 GB in an SDXL LoRA run whose steps peaked at 6.5 GB), while the memory estimate
    # allows for one picture. On a CPU larger calls only cost memory bandwidth (0.87 s an image one at
    # a time, 1.07 s four at a time).
    batch_size: int = 1

    def __init__(self, vae, cfg, cache: bool, disk=None):
        self.vae, self.cfg, self.cache, self.disk = vae, cfg, cache, disk
        self._store: Dict[Tuple[str, bool], Tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(vae_input(batch, self.vae)).latent_dist
        return dist.mean.float().cpu().contiguous(), dist.std.float().cpu().contiguous()

    def precompute(self, views: Sequence[Tuple[Example, View]],
                   progress: Optional[Callable[[int, int], None]] = None):
        """Have the latents of these (example, view) pairs: from the disk cache, else encoded in batches."""
        from dreambooth_ext.train.latent_cache import chunks

        todo = []
        for ex, view in views:
            key = (str(ex.path), view.flip)
            if key in self._store:
                continue
            name = self.disk.name(ex, view.crop_tl, view.flip) if self.disk else None
            hit = self.disk.read(name) if name else None
            if hit is not None:
                self._store[key] = hit
            else:
                todo.append((ex, view, name))
        by_bucket: Dict[Tuple[int, int], list] = {}
        for item in todo:
            by_bucket.setdefault(tuple(item[0].bucket), []).append(item)
        done = len(views) - len(todo)
        for items in by_bucket.values():
            for batch in chunks(items, self.batch_size):
                mean, std = self._encode(torch.stack([pixels(ex, v, self.cfg) for ex, v, _ in batch]))
                for (ex, v, name), m, s in zip(batch, mean, std):
                    self._store[(str(ex.path), v.flip)] = (m.clone(), s.clone())
                    if name:
                        self.disk.write(name, m, s)
                done += len(batch)
                if progress:
                    progress(done, len(views))
        if progress and not todo:
            progress(len(views), len(views))

    def get(self, examples: Sequence[Example], views: Sequence[View]) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.cache:
            missing = [(ex, v) for ex, v in zip(examples, views) if (str(ex.path), v.flip) not in self._store]
            if missing:  # a view the plan did not foresee: cache it now
                self.precompute(missing)
            pairs = [self._store[(str(ex.path), v.flip)] for ex, v in zip(examples, views)]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return self._encode(torch.stack([pixels(ex, v, self.cfg) for ex, v in zip(examples, views)]))
