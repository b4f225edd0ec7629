"""Prompts -> the UNet's conditioning, the way the WebUI builds it in txt2img (see long_prompts)."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dreambooth_ext.train.long_prompts import CHUNK, batch_chunks
from dreambooth_ext.train.prompt_weights import apply_weights


@dataclass(frozen=True)
class TextOptions:
    """How prompts are read: chunks of 75 tokens (1-3), the WebUI's clip skip (SD1 only; 1 = last layer),
    and whether emphasis and BREAK are read as the WebUI reads them (prompt_weights)."""

    max_chunks: int = 1
    clip_skip: int = 1
    weighting: bool = False

    @classmethod
    def from_config(cls, cfg, family: str) -> "TextOptions":
        return cls(max(1, cfg.max_prompt_tokens // CHUNK), cfg.clip_skip if family == "sd1" else 1,
                   cfg.prompt_weighting)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _sd_hidden(encoder, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """SD1/SD2 conditioning of one chunk: the last hidden state, or with clip skip N the N-th from the end
    passed through the encoder's final layer norm, as the WebUI's "stop at last layers" does."""
    if clip_skip <= 1:
        return encoder(ids)[0]
    out = encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    norm = getattr(encoder, "module", encoder).text_model.final_layer_norm
    if hidden.dtype != norm.weight.dtype:
        # fp32 states (accelerate's wrapper of a trained encoder) into a half-precision frozen norm: a GPU's
        # autocast runs layer norms in fp32 and the CPU's refuses the mix, so do here what the GPU does
        return F.layer_norm(hidden.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return norm(hidden)


def encode_prompts(text_encoders: List[torch.nn.Module], tokenizers: list, prompts: Sequence[str],
                   sdxl: bool, options: Optional[TextOptions] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states [B, 77 * chunks, D], pooled [B, P] for SDXL else None).

    SD1/SD2: the encoder's last hidden state (SD2's encoder already stops at the penultimate
    layer). SDXL: both encoders' penultimate hidden states side by side, and the second
    encoder's projected pooled output of the first chunk, as the WebUI does.
    """
    options = options or TextOptions()
    device = next(text_encoders[0].parameters()).device
    if not sdxl:
        chunks = batch_chunks(tokenizers[0], prompts, options.max_chunks, options.weighting)
        states = [apply_weights(_sd_hidden(text_encoders[0], torch.tensor(ids, device=device), options.clip_skip),
                                torch.tensor(weights)) for ids, weights in chunks]
        return torch.cat(states, dim=1), None
    per_encoder, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        states = []
        for i, (ids, weights) in enumerate(batch_chunks(tokenizer, prompts, options.max_chunks, options.weighting)):
            out = encoder(torch.tensor(ids, device=device), output_hidden_states=True)
            states.append(apply_weights(out.hidden_states[-2], torch.tensor(weights)))  # the pooled output is not weighted
            if i == 0:
                pooled = out[0]  # the last encoder's projected text embedding, first chunk
        per_encoder.append(torch.cat(states, dim=1))
    return torch.cat(per_encoder, dim=-1), pooled


def pad_chunks(embeddings: List[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Stack per-prompt embeddings [T_i, D] of different chunk counts, the shorter ones followed by the
    empty prompt's chunk `empty` [77, D] as the WebUI pads a batch."""
    longest = max(e.shape[0] for e in embeddings)
    out = []
    for e in embeddings:
        extra = (longest - e.shape[0]) // empty.shape[0]
        out.append(torch.cat([e] + [empty.to(e.device, e.dtype)] * extra) if extra else e)
    return torch.stack(out)


def sdxl_time_ids(original_hw: Tuple[int, int], crop_tl: Tuple[int, int], target_hw: Tuple[int, int]) -> torch.Tensor:
    """SDXL's size and crop conditioning for one image."""
    return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)
