"""One micro-batch: latents drawn from their cached distributions, conditioning, and its loss."""

from typing import Dict, List, Optional, Tuple

import torch

from dreambooth_ext.train.caption_variation import caption_for_step, varies
from dreambooth_ext.train.conditioning import TextOptions, encode_prompts, pad_chunks, sdxl_time_ids
from dreambooth_ext.train.dataset import ExampleSet, LatentSource, choose_view, derived_seed
from dreambooth_ext.train.loss import diffusion_loss


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


class MicroBatch:
    """Computes the loss of one set of examples at one micro-batch index."""

    def __init__(self, cfg, bundle, unet, latents: LatentSource, prompts: PromptCache, device, weight_dtype):
        self.cfg, self.bundle, self.unet = cfg, bundle, unet
        self.latents, self.prompts, self.device, self.weight_dtype = latents, prompts, device, weight_dtype

    def loss(self, examples: ExampleSet, micro: int, tag: str, te_grad: bool) -> torch.Tensor:
        idx = examples.batch(micro)
        chosen = [examples.examples[i] for i in idx]
        views = [choose_view(ex, self.cfg, micro, slot) for slot, ex in enumerate(chosen)]
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
        return diffusion_loss(self.unet, self.bundle.noise_scheduler, latents, emb.to(self.weight_dtype),
                              seed=derived_seed(self.cfg.seed, "noise", tag, micro),
                              offset_noise=self.cfg.offset_noise, min_snr_gamma=self.cfg.min_snr_gamma,
                              added_cond=added)

    def all_prompts(self, *sets: ExampleSet) -> List[str]:
        return [ex.prompt for s in sets for ex in s.examples]
