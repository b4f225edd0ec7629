"""Tiny models with LoRA adapters for the LoRA tests: the families' test sizes and two released block layouts,
their outputs on fixed inputs, and the merge the tests use to compare a file's effect with plain weights."""

import copy

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from dreambooth_ext.bridge.family_data import load_family, new_text_encoder
from dreambooth_ext.tiny import tiny_family
from dreambooth_ext.train.lora import ADAPTER, add_lora, lora_layers, lora_parameters


def released_layout_sd1():
    """SD1's real block layout (4 levels, 2 resnets each) at a tiny width."""
    fam = tiny_family("sd1")
    real = load_family("sd1")["unet"]
    fam["unet"].update({k: real[k] for k in ("down_block_types", "up_block_types", "layers_per_block")})
    fam["unet"]["block_out_channels"] = [32, 32, 64, 64]
    return fam


def released_layout_sdxl():
    """SDXL's real block layout (3 levels, 2 resnets each, attention in up level 0) at a tiny width."""
    fam = tiny_family("sdxl")
    real = load_family("sdxl")["unet"]
    fam["unet"].update({k: real[k] for k in ("down_block_types", "up_block_types", "layers_per_block")})
    fam["unet"].update({"block_out_channels": [32, 64, 64], "attention_head_dim": 2, "transformer_layers_per_block": 1})
    return fam


def family_dict(name):
    variants = {"sd1-released": released_layout_sd1, "sdxl-released": released_layout_sdxl}
    return variants[name]() if name in variants else tiny_family(name)


def build(name, seed=0):
    fam = family_dict(name)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**fam["unet"]).eval()
    tes = [new_text_encoder(te).eval()
           for te in fam["text_encoders"]]
    return fam["family"], unet, tes


def inputs(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = {
        "sample": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 7, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        x["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return x


@torch.no_grad()
def outputs(unet, tes):
    ids = torch.tensor([[0, 5, 17, 300, 999, 2, 1]])
    return [unet(**inputs(unet)).sample] + [te(input_ids=ids).last_hidden_state for te in tes]


def assert_same(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def perturb(models, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in models:
            for p in lora_parameters(m):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def with_lora(name, preset="attention_ff_conv", rank=4, alpha=2.0, te_rank=2, te_alpha=4.0):
    family, unet, tes = build(name)
    base = (copy.deepcopy(unet), copy.deepcopy(tes))
    add_lora(unet, preset, rank, alpha)
    for te in tes:
        add_lora(te, preset, te_rank, te_alpha, is_text_encoder=True)
    perturb([unet] + tes)
    return family, unet, tes, base


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every adapter's delta into its base weight and take the adapters out, in place."""
    for path, layer in sorted(lora_layers(model).items(), key=lambda kv: -len(kv[0])):
        layer.merge(adapter_names=[ADAPTER])
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config  # set by peft at injection; a model without adapters should not claim any
    return model


def merge_lora_into(unet, text_encoders) -> None:
    """Bake every adapter into its base weight and remove the adapters, in place (deepcopy first to keep them)."""
    for model in [unet] + list(text_encoders):
        merge_lora(model)
