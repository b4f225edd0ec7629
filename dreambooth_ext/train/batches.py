"""One micro-batch: latents drawn from their cached distributions, conditioning, and its loss."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from dreambooth_ext.train.caption_variation import caption_for_step, varies
from dreambooth_ext.train.conditioning import TextOptions, encode_prompts, pad_chunks, sdxl_time_ids
from dreambooth_ext.train.dataset import ExampleSet, LatentSource, View, choose_view, flip_at
from dreambooth_ext.train.derived import derived_seed
from dreambooth_ext.train.loss import noised, prediction_loss


class PromptCache:
    """Embeddings of prompts encoded once while the text encoder is frozen; encoded live otherwise.

    A prompt not encoded beforehand (a caption whose tags were shuffled this step) is encoded live.
    Prompts of different chunk counts in one batch are padded with the empty prompt's chunk.
    """

    def __init__(self, bundle, text_encoders, enabled: bool, options: Optional[TextOptions] = None):
        self.bundle, self.text_encoders, self.enabled = bundle, text_encoders, enabled
        self.options = options or TextOptions()
        self._store: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def _encode(self, prompts):
        return encode_prompts(self.text_encoders, self.bundle.tokenizers, list(prompts), self.bundle.is_sdxl,
                              self.options)

    @torch.no_grad()
    def precompute(self, prompts):
        for p in dict.fromkeys(list(prompts) + [""]):
            if p not in self._store:
                emb, pooled = self._encode([p])
                self._store[p] = (emb[0].cpu(), None if pooled is None else pooled[0].cpu())

    def get(self, prompts, device, grad: bool):
        if self.enabled:
            if any(p not in self._store for p in prompts):
                with torch.no_grad():
                    return self._encode(prompts)
            pairs = [self._store[p] for p in prompts]
            emb = pad_chunks([e for e, _ in pairs], self._store[""][0]).to(device)
            pooled = None if pairs[0][1] is None else torch.stack([q for _, q in pairs]).to(device)
            return emb, pooled
        with torch.set_grad_enabled(grad):
            return self._encode(prompts)


@dataclass
class _Half:
    """One side (instance or class) of a micro-batch, noised and ready for the UNet."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    cond: torch.Tensor
    added: Optional[Dict[str, torch.Tensor]]

    def shape_key(self):
        added = None if self.added is None else {k: tuple(v.shape[1:]) for k, v in self.added.items()}
        return tuple(self.noisy.shape[1:]), tuple(self.cond.shape[1:]), added


class MicroBatch:
    """Computes the loss of one micro-batch: its instance examples plus, weighted, its class examples."""

    merge_halves = True  # one UNet pass over both halves where their shapes match (False: two passes)

    def __init__(self, cfg, bundle, unet, latents: LatentSource, prompts: PromptCache, device, weight_dtype):
        self.cfg, self.bundle, self.unet = cfg, bundle, unet
        self.latents, self.prompts, self.device, self.weight_dtype = latents, prompts, device, weight_dtype
        self._crops: Dict[str, Tuple[int, int]] = {}  # with cached latents an image's crop is fixed: draw it once

    def loss(self, instances: ExampleSet, classes: ExampleSet, micro: int, te_grad: bool) -> torch.Tensor:
        """Instance loss + prior_loss_weight * class loss (when there are class examples) at one index."""
        halves = [self._half(instances, micro, "instance", te_grad)]
        if len(classes):
            halves.append(self._half(classes, micro, "class", te_grad))
        preds = self._predict(halves)
        gamma, scheduler = self.cfg.min_snr_gamma, self.bundle.noise_scheduler
        losses = [prediction_loss(scheduler, p, h.target, h.timesteps, gamma) for p, h in zip(preds, halves)]
        return losses[0] if len(losses) == 1 else losses[0] + self.cfg.prior_loss_weight * losses[1]

    def _predict(self, halves: List[_Half]) -> List[torch.Tensor]:
        if len(halves) == 1 or not self.merge_halves or halves[0].shape_key() != halves[1].shape_key():
            return [self.unet(h.noisy, h.timesteps, h.cond, added_cond_kwargs=h.added).sample for h in halves]
        # the UNet treats batch rows independently (GroupNorm, no batch statistics): one pass, then split
        sizes = [h.noisy.shape[0] for h in halves]
        added = None
        if halves[0].added is not None:
            added = {k: torch.cat([h.added[k] for h in halves]) for k in halves[0].added}
        pred = self.unet(torch.cat([h.noisy for h in halves]), torch.cat([h.timesteps for h in halves]),
                         torch.cat([h.cond for h in halves]), added_cond_kwargs=added).sample
        return list(pred.split(sizes))

    def _view(self, example, micro: int, slot: int):
        if not self.cfg.cache_latents:
            return choose_view(example, self.cfg, micro, slot)
        key = str(example.path)
        if key not in self._crops:
            self._crops[key] = choose_view(example, self.cfg, micro, slot).crop_tl
        return View(self._crops[key], flip_at(self.cfg, micro, slot))

    def _half(self, examples: ExampleSet, micro: int, tag: str, te_grad: bool) -> _Half:
        idx = examples.batch(micro)
        chosen = [examples.examples[i] for i in idx]
        views = [self._view(ex, micro, slot) for slot, ex in enumerate(chosen)]
        # encoding (latents not cached) runs in the VAE's own dtype: autocast's fp16 would overflow a fp32 SD VAE
        with torch.autocast(torch.device(self.device).type, enabled=False):
            mean, std = self.latents.get(chosen, views)
        gen = torch.Generator().manual_seed(derived_seed(self.cfg.seed, "latent", tag, micro))
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.bundle.vae_scale
        latents = latents.to(self.device, self.weight_dtype)
        prompts = [ex.prompt for ex in chosen]
        if tag == "instance" and varies(self.cfg):  # class prompts stay as their images were made
            prompts = [caption_for_step(p, self.cfg, micro, slot) for slot, p in enumerate(prompts)]
        emb, pooled = self.prompts.get(prompts, self.device, te_grad)
        added = None
        if self.bundle.is_sdxl:
            ids = [sdxl_time_ids((ex.size[1], ex.size[0]), v.crop_tl, (ex.bucket[1], ex.bucket[0]))
                   for ex, v in zip(chosen, views)]
            added = {"text_embeds": pooled.to(self.device, self.weight_dtype),
                     "time_ids": torch.stack(ids).to(self.device, self.weight_dtype)}
        noisy, timesteps, target = noised(self.bundle.noise_scheduler, latents, offset_noise=self.cfg.offset_noise,
                                          seed=derived_seed(self.cfg.seed, "noise", tag, micro))
        return _Half(noisy, timesteps, target, emb.to(self.weight_dtype), added)

    def all_prompts(self, *sets: ExampleSet) -> List[str]:
        return [ex.prompt for s in sets for ex in s.examples]
