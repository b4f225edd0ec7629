"""Prompts -> the UNet's conditioning, the same way the inference pipelines build it."""

from typing import List, Optional, Sequence, Tuple

import torch


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(text_encoders: List[torch.nn.Module], tokenizers: list, prompts: Sequence[str],
                   sdxl: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states [B, 77, D], pooled [B, P] for SDXL else None).

    SD1/SD2: the encoder's last hidden state (SD2's encoder already stops at the penultimate
    layer). SDXL: both encoders' penultimate hidden states side by side, and the second
    encoder's projected pooled output, as StableDiffusionXLPipeline does.
    """
    device = next(text_encoders[0].parameters()).device
    if not sdxl:
        return text_encoders[0](tokenize(tokenizers[0], prompts).to(device))[0], None
    states, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected text embedding
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(original_hw: Tuple[int, int], crop_tl: Tuple[int, int], target_hw: Tuple[int, int]) -> torch.Tensor:
    """SDXL's size and crop conditioning for one image."""
    return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)
