"""Text-encoder tables.

SD1 and SDXL's first encoder are stored in the Hugging Face CLIP layout already, so
their rows are plain copies under a prefix. SD2 and SDXL's second encoder are stored in
the OpenCLIP layout: fused q/k/v (`in_proj`), other names, and a projection matrix
applied from the right.
"""

from typing import List, Sequence

from dreambooth_ext.bridge.keymap import COPY, SPLIT3, TRANSPOSE, Row

POSITION_IDS = "text_model.embeddings.position_ids"
# Buffers a diffusers folder may hold that are derived, not learned: dropped where the
# single-file layout has no place for them (OpenCLIP keeps no position_ids).
DERIVED_BUFFERS = (POSITION_IDS,)

OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def clip_rows(diffusers_keys: Sequence[str]) -> List[Row]:
    """HF CLIP layout: same names on both sides. position_ids is a buffer some files lack."""
    rows = [Row(k, (k,), COPY, optional=(k == POSITION_IDS)) for k in diffusers_keys if k != POSITION_IDS]
    rows.append(Row(POSITION_IDS, (POSITION_IDS,), COPY, optional=True))
    return rows


def openclip_rows(num_layers: int, with_projection: bool) -> List[Row]:
    """OpenCLIP text tower (single-file side without the `...model.` prefix)."""
    rows = [
        Row("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
        Row("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
        Row("ln_final.weight", ("text_model.final_layer_norm.weight",)),
        Row("ln_final.bias", ("text_model.final_layer_norm.bias",)),
    ]
    for i in range(num_layers):
        hf = f"text_model.encoder.layers.{i}."
        oc = f"transformer.resblocks.{i}."
        for new, old in OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                rows.append(Row(f"{oc}{old}.{kind}", (f"{hf}{new}.{kind}",)))
        for kind in ("weight", "bias"):
            qkv = tuple(f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv")
            rows.append(Row(f"{oc}attn.in_proj_{kind}", qkv, SPLIT3))
    if with_projection:
        rows.append(Row("text_projection", ("text_projection.weight",), TRANSPOSE))
    return rows


def strip_legacy_clip(key: str) -> str:
    """Older SD1 files store `transformer.embeddings.*` without the `text_model.` level."""
    for head in ("embeddings.", "encoder.", "final_layer_norm."):
        if key.startswith(head):
            return "text_model." + key
    return key
