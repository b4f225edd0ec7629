"""Family dict -> a WebUI/LDM yaml (the inverse of ldm_yaml.parse_yaml), for files the WebUI cannot size alone."""

from typing import Any, Dict, List, Optional

import yaml

from dreambooth_ext.bridge.ldm_yaml import (
    LDM_PARAMETERIZATION,
    LDM_TO_DIFFUSERS_BETAS,
    OPENCLIP_ARCH,
    SDXL_TIME_KEYS,
    STOCK_VAE_RESOLUTION,
    UNET_FIXED,
    VAE_FIXED,
)


def _style(family: dict) -> str:
    """sgm (generative-models, SDXL) or ldm (Stability stablediffusion, SD1/SD2)."""
    if family.get("family") == "sdxl" or family.get("pipeline") == "StableDiffusionXLPipeline":
        return "sgm"
    return "ldm"


def _openclip_first(family: dict) -> bool:
    name = family.get("family")
    if name in ("sd1", "sd2", "sd2-v"):
        return name != "sd1"
    tes = family.get("text_encoders") or [{}]
    return tes[0].get("tokenizer_pad") == "!"


def _check_fixed(config: dict, fixed: Dict[str, tuple], what: str):
    for key, allowed in fixed.items():
        if key in config and config[key] not in allowed:
            if key == "only_cross_attention" and isinstance(config[key], list) and not any(config[key]):
                continue
            raise ValueError(f"{what} {key}={config[key]!r} cannot be written as an LDM config")


def _multipliers(channels: List[int], what: str) -> List[int]:
    if not channels or any(c % channels[0] for c in channels):
        raise ValueError(f"{what} block_out_channels {channels} are not multiples of the first level")
    return [c // channels[0] for c in channels]


def _unet_params(unet: dict, style: str) -> dict:
    _check_fixed(unet, UNET_FIXED, "UNet")
    blocks = list(unet["block_out_channels"])
    n = len(blocks)
    mult = _multipliers(blocks, "UNet")
    down, up = list(unet["down_block_types"]), list(unet["up_block_types"])
    if len(down) != n or len(up) != n:
        raise ValueError("UNet down/up block types must list one type per level")
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise ValueError(f"UNet down blocks {down} are not CrossAttnDownBlock2D/DownBlock2D")
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if up != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        raise ValueError(f"UNet up blocks {up} do not mirror the down blocks {down}, as the LDM UNet needs")
    # the middle transformer uses the last level's channels, heads and depth
    used = [i for i in range(n) if attn[i]] + [n - 1]

    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    head_key: Dict[str, int] = {}
    if isinstance(heads, int):
        head_key["num_heads"] = heads
    else:
        heads = list(heads)
        if len(heads) != n:
            raise ValueError(f"UNet attention_head_dim {heads} does not list one value per level")
        widths = {blocks[i] // heads[i] for i in used if blocks[i] % heads[i] == 0}
        if len(widths) == 1 and all(blocks[i] % heads[i] == 0 for i in used):
            head_key["num_head_channels"] = widths.pop()
        elif len({heads[i] for i in used}) == 1:
            head_key["num_heads"] = heads[used[0]]
        else:
            raise ValueError(f"UNet heads {heads} are neither a fixed count nor a fixed width per head")

    depth = unet.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        depth = list(depth)
        if len(depth) != n:
            raise ValueError(f"UNet transformer_layers_per_block {depth} does not list one value per level")
        if style == "ldm":  # Stability's ldm UNet takes a single depth
            if len({depth[i] for i in used}) != 1:
                raise ValueError(f"UNet transformer depths {depth} vary by level, which the SD1/SD2 LDM UNet cannot do")
            depth = depth[used[0]]
    layers = unet["layers_per_block"]
    layers = list(layers) if isinstance(layers, (list, tuple)) else layers

    out: Dict[str, Any] = {}
    if style == "sgm":
        if unet.get("addition_embed_type") != "text_time" or not unet.get("projection_class_embeddings_input_dim"):
            raise ValueError("an SDXL UNet needs addition_embed_type text_time and projection_class_embeddings_input_dim")
        out.update(adm_in_channels=unet["projection_class_embeddings_input_dim"], num_classes="sequential")
    elif unet.get("addition_embed_type") is not None:
        raise ValueError(f"UNet addition_embed_type {unet['addition_embed_type']!r} needs an SDXL (sgm) config")
    out["use_checkpoint"] = True
    if style == "ldm":
        out["image_size"] = unet["sample_size"]
    out.update(
        in_channels=unet["in_channels"],
        out_channels=unet["out_channels"],
        model_channels=blocks[0],
        attention_resolutions=[2 ** i for i in range(n) if attn[i]],
        num_res_blocks=layers,
        channel_mult=mult,
        **head_key,
        use_spatial_transformer=True,
        use_linear_in_transformer=bool(unet.get("use_linear_projection", False)),
        transformer_depth=depth,
        context_dim=unet["cross_attention_dim"],
    )
    if style == "sgm":
        out["spatial_transformer_attn_type"] = "softmax-xformers"
    out["legacy"] = False
    return out


def _vae_params(vae: dict) -> dict:
    _check_fixed(vae, VAE_FIXED, "VAE")
    blocks = list(vae["block_out_channels"])
    n = len(blocks)
    if list(vae.get("down_block_types", [])) != ["DownEncoderBlock2D"] * n or \
            list(vae.get("up_block_types", [])) != ["UpDecoderBlock2D"] * n:
        raise ValueError("VAE blocks must be DownEncoderBlock2D/UpDecoderBlock2D, one per level")
    latent = vae["latent_channels"]
    return {
        "embed_dim": latent,
        "monitor": "val/rec_loss",
        "ddconfig": {
            "double_z": True,
            "z_channels": latent,
            "resolution": vae.get("sample_size", STOCK_VAE_RESOLUTION),
            "in_channels": vae["in_channels"],
            "out_ch": vae["out_channels"],
            "ch": blocks[0],
            "ch_mult": _multipliers(blocks, "VAE"),
            "num_res_blocks": vae["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def _ldm_betas(scheduler: dict) -> str:
    schedule = scheduler.get("beta_schedule", "scaled_linear")
    for ldm, diffusers in LDM_TO_DIFFUSERS_BETAS.items():
        if diffusers == schedule:
            return ldm
    raise ValueError(f"beta_schedule {schedule!r} has no LDM equivalent")


def _openclip_params(te: dict, layer: str, slot_width: int) -> dict:
    # A yaml can only name an OpenCLIP arch, not size one. A tower of another width (a tiny
    # test model) keeps its slot's arch name: the bridge reads OpenCLIP sizes off the weights,
    # and the WebUI could not build such a tower from any yaml.
    width = te["config"].get("hidden_size")
    arch, version = OPENCLIP_ARCH.get(width, OPENCLIP_ARCH[slot_width])
    return {"arch": arch, "version": version, "freeze": True, "layer": layer}


def generate_yaml(family: dict, clip_version: Optional[str] = None) -> str:
    """An LDM yaml the WebUI can instantiate for `family`; ValueError if the LDM UNet cannot express it.

    `clip_version` names the HF CLIP text model (hub name or folder) the WebUI should build for
    FrozenCLIPEmbedder; without it the WebUI uses its default, openai/clip-vit-large-patch14.
    """
    style = _style(family)
    unet = _unet_params(family["unet"], style)
    vae = _vae_params(family["vae"])
    scheduler = family["scheduler"]
    prediction = scheduler.get("prediction_type", "epsilon")
    body = _sgm_model(family, unet, vae, prediction, clip_version) if style == "sgm" else \
        _ldm_model(family, unet, vae, prediction, clip_version)
    head = f"# WebUI config for a {family.get('family', 'custom')} model, written by dreambooth_ext\n"
    return head + yaml.dump(body, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


class _Dumper(yaml.SafeDumper):
    """Block mappings, but short lists of numbers inline ([1, 2, 4, 4]) as in Stability's files."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    inline = all(isinstance(v, (int, float, str)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


_Dumper.add_representer(list, _represent_list)


def _ldm_model(family: dict, unet: dict, vae: dict, prediction: str, clip_version: Optional[str]) -> dict:
    scheduler = family["scheduler"]
    kinds = {v: k for k, v in LDM_PARAMETERIZATION.items()}
    if prediction not in kinds:
        raise ValueError(f"prediction_type {prediction!r} has no LDM parameterization")
    inpaint = unet["in_channels"] == 9  # 4 latents + 4 masked-image latents + 1 mask
    params: Dict[str, Any] = {}
    if prediction != "epsilon":
        params["parameterization"] = kinds[prediction]
    params.update(
        linear_start=scheduler.get("beta_start", 0.00085),
        linear_end=scheduler.get("beta_end", 0.012),
        num_timesteps_cond=1,
        log_every_t=200,
        timesteps=scheduler.get("num_train_timesteps", 1000),
        first_stage_key="jpg",
        cond_stage_key="txt",
        image_size=family["unet"]["sample_size"],
        channels=family["unet"]["out_channels"],
        cond_stage_trainable=False,
        conditioning_key="hybrid" if inpaint else "crossattn",
        monitor="val/loss_simple_ema",
        scale_factor=family["vae"].get("scaling_factor", 0.18215),
        use_ema=False,
    )
    betas = _ldm_betas(scheduler)
    if betas != "linear":
        params["beta_schedule"] = betas
    if inpaint:
        params["finetune_keys"] = None
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet}
    params["first_stage_config"] = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae}
    te = (family.get("text_encoders") or [{"config": {}}])[0]
    if _openclip_first(family):
        oc = _openclip_params(te, "penultimate", 1024)
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                # ViT-H-14 is the embedder's default; the WebUI's own SD2 configs leave it out
                "params": {k: v for k, v in oc.items() if k not in ("arch", "version")} if oc["arch"] == "ViT-H-14" else oc}
    else:
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
        if clip_version:
            cond["params"] = {"version": clip_version}
    params["cond_stage_config"] = cond
    target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion" if inpaint else "ldm.models.diffusion.ddpm.LatentDiffusion"
    return {"model": {"base_learning_rate": 1.0e-04, "target": target, "params": params}}


def _sgm_model(family: dict, unet: dict, vae: dict, prediction: str, clip_version: Optional[str]) -> dict:
    scheduler = family["scheduler"]
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction!r} has no sgm denoiser scaling")
    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError("sgm's LegacyDDPMDiscretization only has the scaled_linear beta schedule")
    tes = family.get("text_encoders") or []
    if len(tes) != 2:
        raise ValueError("an SDXL config needs two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG)")
    fam_unet = family["unet"]
    time_dim = fam_unet.get("addition_time_embed_dim") or 256
    pooled = tes[1]["config"].get("projection_dim")
    # the vector input is the pooled text embedding plus three (h, w) pairs, each pair 2 * outdim wide
    if pooled is None or unet["adm_in_channels"] != pooled + 2 * time_dim * len(SDXL_TIME_KEYS):
        raise ValueError(f"projection_class_embeddings_input_dim {unet['adm_in_channels']} is not the pooled text "
                         f"width plus {len(SDXL_TIME_KEYS)} size embeddings, as the SDXL base conditioner gives")
    scale = "VScaling" if prediction == "v_prediction" else "EpsScaling"
    weighting = "VWeighting" if prediction == "v_prediction" else "EpsWeighting"
    disc: Dict[str, Any] = {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
    disc_params = {"linear_start": scheduler.get("beta_start", 0.00085), "linear_end": scheduler.get("beta_end", 0.012),
                   "num_timesteps": scheduler.get("num_train_timesteps", 1000)}
    if disc_params != {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps": 1000}:
        disc["params"] = disc_params
    clip_params: Dict[str, Any] = {"layer": "hidden", "layer_idx": tes[0]["config"].get("num_hidden_layers", 12) - 1}
    if clip_version:
        clip_params["version"] = clip_version
    oc = _openclip_params(tes[1], "penultimate", 1280)
    oc.update(always_return_pooled=True, legacy=False)
    emb_models: List[dict] = [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": clip_params},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": oc},
    ]
    for key in SDXL_TIME_KEYS:
        emb_models.append({"is_trainable": False, "input_key": key,
                           "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                           "params": {"outdim": time_dim}})
    vae = dict(vae)
    vae["ddconfig"] = {"attn_type": "vanilla-xformers", **vae["ddconfig"]}
    params = {
        "scale_factor": family["vae"].get("scaling_factor", 0.13025),
        "disable_first_stage_autocast": True,
        "denoiser_config": {
            "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
            "params": {
                "num_idx": scheduler.get("num_train_timesteps", 1000),
                # the WebUI's pinned sgm still requires weighting_config
                "weighting_config": {"target": f"sgm.modules.diffusionmodules.denoiser_weighting.{weighting}"},
                "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scale}"},
                "discretization_config": disc,
            },
        },
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": emb_models}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": vae},
    }
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}
