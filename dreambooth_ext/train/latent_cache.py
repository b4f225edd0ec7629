"""Cached latents on disk: encoded once per image, view and VAE, reused by a resumed or repeated run.

An entry's name is a hash of what decides its value: the image file's bytes, the bucket it is
trained at, its crop and flip, and the VAE encoder's weights and dtype. Anything else changed
(another image under the same name, another base) simply misses the cache.
"""

import hashlib
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

FORMAT = "latents-1"  # bump when the pixel pipeline (resize, crop, scaling) changes


def _file_digest(path: Path, memo: Dict[str, str]) -> str:
    key = str(path)
    if key not in memo:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def vae_identity(vae) -> str:
    """A digest of what encoding depends on: the encoder's (and quant conv's) weights and their dtype."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in vae.state_dict().items():
        if name.startswith("decoder.") or name.startswith("post_quant_conv."):
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DiskCache:
    """One small safetensors file (mean, std) per encoded view in `folder`; a failed write is only a warning."""

    def __init__(self, folder: Path, vae, warn: Callable[[str], None]):
        self.folder, self.warn = Path(folder), warn
        self.vae_id = vae_identity(vae)
        self._digests: Dict[str, str] = {}
        self._write_failed = False

    def name(self, example, crop_tl: Tuple[int, int], flip: bool) -> str:
        parts = (FORMAT, self.vae_id, _file_digest(example.path, self._digests), tuple(example.bucket),
                 tuple(crop_tl), bool(flip))
        return hashlib.blake2b(repr(parts).encode(), digest_size=20).hexdigest()

    def read(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load_file

        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            return t["mean"], t["std"]
        except Exception:  # noqa: BLE001 - a damaged entry is only a miss: it is encoded again
            return None

    def write(self, name: str, mean: torch.Tensor, std: torch.Tensor):
        from safetensors.torch import save_file

        from dreambooth_ext.atomic import atomic_path
        from dreambooth_ext.errors import UserError

        if self._write_failed:
            return
        try:
            with atomic_path(self.folder / f"{name}.safetensors") as tmp:
                save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp))
        except (OSError, UserError) as e:
            self._write_failed = True
            self.warn(f"Latents could not be cached in {self.folder} ({str(e).splitlines()[0]}); "
                      "training goes on, and the next run encodes them again.")


def used_views(examples, total_batches: int, cfg) -> List[Tuple[object, object]]:
    """(example, view) of every view the first `total_batches` micro-batches show, in first-use order.

    A short run with many class images uses only some of them: only those are encoded.
    """
    from dreambooth_ext.train.dataset import choose_view

    seen: Dict[Tuple[int, bool], object] = {}
    possible = len(examples) * (2 if cfg.hflip else 1)
    for index in range(total_batches if len(examples) else 0):
        for slot, i in enumerate(examples.batch(index)):
            view = choose_view(examples.examples[i], cfg, index, slot)
            seen.setdefault((i, view.flip), view)
        if len(seen) == possible:
            break
    return [(examples.examples[i], view) for (i, _), view in seen.items()]


def chunks(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
