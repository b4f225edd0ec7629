"""Tiny random-weight models of every family, for the demo, the tests and a first try on a CPU.

They keep each family's real structure (block pattern, text-encoder layouts, 8x VAE) at a
few MB, and are written as a WebUI single file with a beside-yaml, the way the WebUI
itself is told about a non-standard size.
"""

import copy
import json
from pathlib import Path
from typing import Dict, Optional

import torch

from dreambooth_ext.bridge.components import TEXT_ENCODER, text_encoder_name
from dreambooth_ext.bridge.family_data import load_family, new_text_encoder

TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 32,  # the LDM UNet hard-codes 32 groups, so channels stay multiples of 32
    "sample_size": 16,
}
TINY_VAE = {
    "block_out_channels": [32, 32, 64, 64],  # four levels: the real 8x downsampling
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 128,
}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32}
# OpenCLIP towers get their head count as width // 64 when read back, so they are 64 wide
TINY_OPENCLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "num_hidden_layers": 2, "projection_dim": 64}


def tiny_family(name: str) -> dict:
    """The family dict of a tiny model shaped like `name` (sd1, sd2, sd2-v, sdxl)."""
    fam = copy.deepcopy(load_family(name))
    fam["description"] = "tiny random-weight " + fam["family"] + " for tests and demos"
    fam["unet"].update(TINY_UNET)
    fam["vae"].update(TINY_VAE)
    texts = [TINY_CLIP] if name == "sd1" else [TINY_OPENCLIP] if name.startswith("sd2") else [TINY_CLIP, TINY_OPENCLIP]
    for te, size in zip(fam["text_encoders"], texts):
        te["config"].update(size)
    if name == "sdxl":
        fam["unet"].update({
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [1, 2],
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": TINY_OPENCLIP["projection_dim"] + 6 * 8,
        })
    else:
        fam["unet"].update({
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 2 if name == "sd1" else [1, 2],
        })
    fam["unet"]["cross_attention_dim"] = sum(t["config"]["hidden_size"] for t in fam["text_encoders"])
    return fam


def build_models(fam: dict, seed: int = 0) -> Dict[str, torch.nn.Module]:
    """Random-weight diffusers/transformers modules for a family dict.

    The VAE's scaling factor is calibrated (and written into `fam`) so its latents of real
    pictures have unit variance, which is what the real models' factors (0.18215, 0.13025) do:
    without it a random VAE's latents are ~50x smaller than the noise diffusion starts from.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    models = {
        "unet": UNet2DConditionModel(**fam["unet"]),
        "vae": AutoencoderKL(**fam["vae"]),
    }
    for i, te in enumerate(fam["text_encoders"]):
        encoder = new_text_encoder(te)
        with torch.no_grad():
            # a fresh layer norm has bias 0, so the encoder's output averages to exactly 0 once saved
            # in fp16, and the WebUI's prompt emphasis (z * mean(z) / mean(z * weights)) divides 0 by 0
            encoder.text_model.final_layer_norm.bias.normal_(0.0, 0.1)
        models[text_encoder_name(i)] = encoder
    _sharpen_vae(models["vae"], fam["vae"]["latent_channels"])
    scale = _unit_variance_scale(models["vae"])
    models["vae"].register_to_config(scaling_factor=scale)
    fam["vae"]["scaling_factor"] = scale
    return {k: m.eval() for k, m in models.items()}


@torch.no_grad()
def _sharpen_vae(vae, channels: int):
    """A trained VAE encodes almost deterministically (log-variance near -20); a random one
    samples with std ~1, which would bury every image in noise. Fix the log-variance half of
    quant_conv to -20, as a trained VAE would have it."""
    vae.quant_conv.weight[channels:] = 0
    vae.quant_conv.bias[channels:] = -20.0


@torch.no_grad()
def _unit_variance_scale(vae) -> float:
    """1 / std of the VAE's latent means over the bundled demo pictures, rounded for readable configs."""
    import numpy as np
    from PIL import Image

    folder = Path(__file__).resolve().parent / "data" / "demo" / "instance"
    pictures = [np.asarray(Image.open(p).convert("RGB").resize((64, 64)), dtype=np.float32) / 127.5 - 1
                for p in sorted(folder.glob("*.png"))]
    batch = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2)
    std = vae.encode(batch).latent_dist.mean.std().item()
    return float(f"{1.0 / std:.5g}")


def save_diffusers(fam: dict, models: Dict[str, torch.nn.Module], folder: Path, sidecar: Optional[dict] = None):
    """A diffusers folder of these modules, written with the bridge's own config writer."""
    from safetensors.torch import save_file

    from dreambooth_ext.bridge.diffusers_folder import SIDECAR, write_configs

    folder = Path(folder)
    write_configs(folder, fam)
    for name, model in models.items():
        file = "model.safetensors" if name.startswith(TEXT_ENCODER) else "diffusion_pytorch_model.safetensors"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / name / file))
    if sidecar:
        (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return folder


def write_clip_folder(model, tokenizer_pad: str, folder: Path):
    """What a beside-yaml's `cond_stage_config.params.version` names: a local CLIP text model + tokenizer."""
    from dreambooth_ext.tokenizer_files import write_tokenizer

    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=False)  # .bin: the WebUI lists every .safetensors as a checkpoint
    write_tokenizer(folder, pad_token=tokenizer_pad)
    return folder


def write_tiny_checkpoint(name: str, path, seed: int = 0, extra_openclip_layer: bool = True) -> Path:
    """A tiny single-file checkpoint at `path`, with its beside-yaml (see `single_file_from_models`)."""
    fam = tiny_family(name)
    return single_file_from_models(fam, build_models(fam, seed), path, seed, extra_openclip_layer)


def single_file_from_models(fam: dict, models: Dict[str, torch.nn.Module], path, seed: int = 0,
                            extra_openclip_layer: bool = True) -> Path:
    """Write modules as a WebUI single file with the beside-yaml that describes their size.

    An HF-layout CLIP text encoder gets a local folder the yaml's `version` names (the WebUI's
    way to size it). Real SD2 files hold one more OpenCLIP layer than SD2 uses, and a projection
    it ignores; `extra_openclip_layer` adds them so tiny files have the same shape of problem.
    """
    import tempfile

    from safetensors.torch import save_file

    from dreambooth_ext.bridge.diffusers_folder import EXTRAS
    from dreambooth_ext.bridge.ldm_yaml_write import generate_yaml
    from dreambooth_ext.bridge.to_single import diffusers_to_single_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clip_version = None
    if not fam["family"].startswith("sd2"):
        te = fam["text_encoders"][0]
        # absolute: the WebUI resolves the yaml's version against its own working folder
        clip_version = str(write_clip_folder(models[TEXT_ENCODER], te["tokenizer_pad"], path.parent / f"{path.stem}.clip").resolve())
    sidecar = {"family": fam["family"], "yaml_text": generate_yaml(fam, clip_version=clip_version)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_diffusers(fam, models, Path(tmp) / "model", sidecar)
        if fam["family"].startswith("sd2") and extra_openclip_layer:
            save_file(_spare_openclip_layer(fam, seed), str(folder / EXTRAS))
        diffusers_to_single_file(folder, path)
    return path


def _spare_openclip_layer(fam: dict, seed: int) -> Dict[str, torch.Tensor]:
    cfg = fam["text_encoders"][0]["config"]
    width, inner, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed + 1)
    shapes = {
        "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "mlp.c_fc.weight": (inner, width), "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (width, inner), "mlp.c_proj.bias": (width,),
    }
    prefix = f"cond_stage_model.model.transformer.resblocks.{n}."
    spare = {prefix + k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    # real SD2 files also carry the CLIP projection and logit scale SD2 never uses
    spare["cond_stage_model.model.text_projection"] = torch.randn(width, width, generator=g) * 0.02
    spare["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    return spare
