"""WebUI/LDM yaml <-> family dict.

A WebUI checkpoint may come with NAME.yaml beside it: the config the WebUI instantiates the
model from (Stability's `ldm` repo for SD1/SD2, `sgm` from generative-models for SDXL).
`parse_yaml` reads such a file into a family dict (the shape of data/families/*.json) without
instantiating anything; `generate_yaml` writes one for a family dict.
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from dreambooth_ext.errors import UserError

# Every Stability yaml carries these training-crop sizes whatever the model's resolution
# (768-v included), so they say nothing about the model and must not replace a known size.
STOCK_IMAGE_SIZE = 64
STOCK_VAE_RESOLUTION = 256
LDM_GROUPS = 32  # LDM's normalization() is GroupNorm(32) everywhere
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "max_position_embeddings", "vocab_size", "hidden_act", "projection_dim", "layer_norm_eps")
# LDM's make_beta_schedule names -> diffusers beta_schedule (LDM "linear" is sqrt-spaced)
LDM_TO_DIFFUSERS_BETAS = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
LDM_PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
OPENCLIP_ARCH = {1024: ("ViT-H-14", "laion2b_s32b_b79k"), 1280: ("ViT-bigG-14", "laion2b_s39b_b160k")}
SDXL_TIME_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")

# diffusers UNet options the LDM UNet has no switch for: the only value each may take
UNET_FIXED: Dict[str, tuple] = {
    "act_fn": ("silu",), "center_input_sample": (False,), "class_embed_type": (None,),
    "class_embeddings_concat": (False,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "cross_attention_norm": (None,), "downsample_padding": (1,), "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "flip_sin_to_cos": (True,),
    "freq_shift": (0,), "mid_block_only_cross_attention": (None, False), "mid_block_scale_factor": (1,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "norm_eps": (1e-05,), "norm_num_groups": (LDM_GROUPS,),
    "num_class_embeds": (None,), "only_cross_attention": (False,), "resnet_out_scale_factor": (1.0,),
    "resnet_skip_time_act": (False,), "resnet_time_scale_shift": ("default",), "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,), "time_embedding_dim": (None,), "time_embedding_type": ("positional",),
    "timestep_post_act": (None,), "attention_type": ("default",), "reverse_transformer_layers_per_block": (None,),
}
VAE_FIXED: Dict[str, tuple] = {
    "act_fn": ("silu",), "norm_num_groups": (LDM_GROUPS,), "mid_block_add_attention": (True,),
    "use_quant_conv": (True,), "use_post_quant_conv": (True,), "shift_factor": (None,),
}


# ---------------------------------------------------------------- reading


def _cls(node: Any) -> str:
    """The class name of a `target:` entry, whatever its module path (ldm., sgm., ...)."""
    target = node.get("target") if isinstance(node, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else ""


def _params(node: Any) -> dict:
    params = node.get("params") if isinstance(node, dict) else None
    return params if isinstance(params, dict) else {}


def _given(value: Any) -> bool:
    return value is not None and value != -1  # LDM uses -1 for "not set"


def _shape_like(template: Any, value: Any, levels: int) -> Any:
    """Say `value` the way the base config says that key (int vs per-level list), if it can."""
    if isinstance(template, list) and isinstance(value, int):
        return [value] * levels
    if isinstance(template, int) and isinstance(value, list) and value and all(v == value[0] for v in value):
        return value[0]
    return value


def _as_list(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} should be a list, not {value!r}")
    return list(value)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} should be a whole number, not {value!r}")
    return value


def parse_yaml(path, base: dict) -> dict:
    """A family dict for the WebUI yaml at `path`: `base` with what the yaml states put over it.

    `base` is the shipped family dict of the family detected from the weights. When the yaml
    switches an SD2 model between epsilon and v-prediction the matching shipped family (sd2 or
    sd2-v) becomes the base, so its sizes and scheduler come along. OpenCLIP text towers are
    named, not sized, in a yaml: their configs stay as in the base.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path.name} could not be read ({e}); fix or remove it.") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path.name} is not valid YAML{at}; fix or remove it.") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise UserError(f"{path.name} has no model.params section, so it is not a WebUI model config; "
                        "fix or remove it.")

    section = "denoiser_config" if "denoiser_config" in params else "model.params"
    try:
        prediction = _prediction_type(params)
        fam = _rebased(base, prediction)
        fam["scheduler"]["prediction_type"] = prediction
        _read_betas(params, fam["scheduler"])
        section = "unet_config" if "unet_config" in params else "network_config"
        unet_node = params.get("unet_config") or params.get("network_config")
        if unet_node is not None:
            _read_unet(_params(unet_node), params, fam["unet"])
        section = "first_stage_config"
        if params.get("first_stage_config") is not None:
            _read_vae(_params(params["first_stage_config"]), params, fam["vae"])
        if "network_config" in params and fam["vae"]["sample_size"] != base["vae"]["sample_size"]:
            # an sgm yaml has no latent size of its own: it follows from the VAE's resolution
            fam["unet"]["sample_size"] = fam["vae"]["sample_size"] // 2 ** (len(fam["vae"]["block_out_channels"]) - 1)
        section = "cond_stage_config" if "cond_stage_config" in params else "conditioner_config"
        _read_text_encoders(params, fam, path.parent)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise UserError(f"{path.name} cannot be used: its {section} is wrong ({e}); fix or remove it.") from None
    return fam


def _prediction_type(params: dict) -> str:
    denoiser = params.get("denoiser_config")
    if denoiser is not None:  # sgm (SDXL): the scaling class says what the UNet predicts
        scaling = _cls(_params(denoiser).get("scaling_config"))
        if scaling in ("EpsScaling", ""):
            return "epsilon"
        if scaling == "VScaling":
            return "v_prediction"
        raise ValueError(f"its denoiser uses {scaling}; only EpsScaling and VScaling can be trained here")
    kind = params.get("parameterization", "eps")
    if kind not in LDM_PARAMETERIZATION:
        raise ValueError(f"parameterization {kind!r} is unknown (eps, v or x0)")
    return LDM_PARAMETERIZATION[kind]


def _rebased(base: dict, prediction: str) -> dict:
    name = base.get("family")
    if name in ("sd2", "sd2-v"):
        want = "sd2-v" if prediction == "v_prediction" else "sd2"
        if want != name:
            from dreambooth_ext.bridge.family_data import load_family

            return load_family(want)
    return copy.deepcopy(base)


def _read_betas(params: dict, scheduler: dict):
    disc = _params(_params(params.get("denoiser_config")).get("discretization_config"))
    start = params.get("linear_start", disc.get("linear_start"))
    end = params.get("linear_end", disc.get("linear_end"))
    steps = params.get("timesteps", disc.get("num_timesteps"))
    if start is not None:
        scheduler["beta_start"] = float(start)
    if end is not None:
        scheduler["beta_end"] = float(end)
    if steps is not None:
        scheduler["num_train_timesteps"] = _int(steps, "timesteps")
    schedule = params.get("beta_schedule")
    if schedule is not None:
        if schedule not in LDM_TO_DIFFUSERS_BETAS:
            raise ValueError(f"beta_schedule {schedule!r} has no diffusers equivalent")
        scheduler["beta_schedule"] = LDM_TO_DIFFUSERS_BETAS[schedule]


def _levels(u: dict, base_channels: List[int], ch_key: str, mult_key: str) -> List[int]:
    """Per-level channels from base width x multipliers; a missing half comes from the base."""
    ch, mult = u.get(ch_key), u.get(mult_key)
    if ch is None and mult is None:
        return list(base_channels)
    ch = _int(ch if ch is not None else base_channels[0], ch_key)
    if mult is None:
        mult = [c // base_channels[0] for c in base_channels]
    return [ch * _int(m, mult_key) for m in _as_list(mult, mult_key)]


def _read_unet(u: dict, params: dict, unet: dict):
    if u.get("use_spatial_transformer") is False:
        raise ValueError("use_spatial_transformer is false; only cross-attention UNets are supported")
    for knob in ("num_attention_blocks", "disable_self_attentions"):
        if u.get(knob) is not None:
            raise ValueError(f"{knob} is set, which diffusers' UNet cannot express")
    for knob in ("resblock_updown", "use_scale_shift_norm", "disable_middle_transformer"):
        if u.get(knob):
            raise ValueError(f"{knob} is true, which diffusers' UNet cannot express")
    for key in ("in_channels", "out_channels"):
        if u.get(key) is not None:
            unet[key] = _int(u[key], key)
    blocks = _levels(u, unet["block_out_channels"], "model_channels", "channel_mult")
    n = len(blocks)
    unet["block_out_channels"] = blocks
    if u.get("num_res_blocks") is not None:
        res = u["num_res_blocks"]
        unet["layers_per_block"] = res if isinstance(res, int) else [_int(r, "num_res_blocks") for r in res]
    if u.get("attention_resolutions") is not None:
        factors = {_int(f, "attention_resolutions") for f in _as_list(u["attention_resolutions"], "attention_resolutions")}
        attn = [2 ** i in factors for i in range(n)]
    else:
        attn = [t.startswith("CrossAttn") for t in unet["down_block_types"]][:n]
        attn += [False] * (n - len(attn))
    unet["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    unet["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]

    # LDM lets num_head_channels win over num_heads when both are set
    heads: Any = None
    if _given(u.get("num_head_channels")):
        head_ch = _int(u["num_head_channels"], "num_head_channels")
        heads = [c // head_ch for c in blocks]
    elif _given(u.get("num_heads")):
        heads = _int(u["num_heads"], "num_heads")
    if heads is not None:
        heads = _shape_like(unet.get("attention_head_dim"), heads, n)
        unet["attention_head_dim"] = heads
        if unet.get("num_attention_heads") is not None:
            unet["num_attention_heads"] = heads

    depth = u.get("transformer_depth", 1)  # LDM's default
    depth = _int(depth, "transformer_depth") if not isinstance(depth, (list, tuple)) else [_int(d, "transformer_depth") for d in depth]
    if isinstance(depth, list) and len(depth) != n:
        raise ValueError(f"transformer_depth lists {len(depth)} levels but channel_mult has {n}")
    unet["transformer_layers_per_block"] = _shape_like(unet.get("transformer_layers_per_block"), depth, n)

    if u.get("context_dim") is not None:
        unet["cross_attention_dim"] = u["context_dim"]
    unet["use_linear_projection"] = bool(u.get("use_linear_in_transformer", False))

    if u.get("adm_in_channels") is not None:
        if u.get("num_classes") != "sequential":
            raise ValueError(f"num_classes {u.get('num_classes')!r} with adm_in_channels is not an SDXL-style UNet")
        unet["addition_embed_type"] = "text_time"
        unet["projection_class_embeddings_input_dim"] = _int(u["adm_in_channels"], "adm_in_channels")
        unet["addition_time_embed_dim"] = _time_embed_dim(params)
    elif u.get("num_classes") is not None:
        raise ValueError(f"num_classes {u['num_classes']!r} is a class-conditional UNet, not supported")

    size = params.get("image_size")  # the UNet's own image_size is marked unused in LDM
    if size is not None and _int(size, "image_size") != STOCK_IMAGE_SIZE:
        unet["sample_size"] = size


def _time_embed_dim(params: dict) -> int:
    cond = _params(params.get("conditioner_config"))
    for emb in cond.get("emb_models") or []:
        if _cls(emb) == "ConcatTimestepEmbedderND":
            return _int(_params(emb).get("outdim", 256), "outdim")
    return 256


def _read_vae(p: dict, params: dict, vae: dict):
    dd = p.get("ddconfig")
    if not isinstance(dd, dict):
        if p.get("encoder_config") is not None:
            raise ValueError("it describes the autoencoder with encoder_config/decoder_config, "
                             "which is not a plain KL autoencoder config (ddconfig)")
        dd = {}
    if dd.get("attn_resolutions"):
        raise ValueError("attn_resolutions is not empty; diffusers' AutoencoderKL has attention only in its middle")
    if dd.get("double_z") is False:
        raise ValueError("double_z is false; only KL autoencoders are supported")
    blocks = _levels(dd, vae["block_out_channels"], "ch", "ch_mult")
    vae["block_out_channels"] = blocks
    vae["down_block_types"] = ["DownEncoderBlock2D"] * len(blocks)
    vae["up_block_types"] = ["UpDecoderBlock2D"] * len(blocks)
    vae["norm_num_groups"] = LDM_GROUPS
    if dd.get("num_res_blocks") is not None:
        vae["layers_per_block"] = _int(dd["num_res_blocks"], "num_res_blocks")
    if dd.get("in_channels") is not None:
        vae["in_channels"] = _int(dd["in_channels"], "in_channels")
    if dd.get("out_ch") is not None:
        vae["out_channels"] = _int(dd["out_ch"], "out_ch")
    z, embed = dd.get("z_channels"), p.get("embed_dim")
    if z is not None and embed is not None and z != embed:
        raise ValueError(f"z_channels {z} differs from embed_dim {embed}; diffusers needs them equal")
    latent = embed if embed is not None else z
    if latent is not None:
        vae["latent_channels"] = _int(latent, "embed_dim")
    res = dd.get("resolution")
    if res is not None and _int(res, "resolution") != STOCK_VAE_RESOLUTION:
        vae["sample_size"] = res
    if params.get("scale_factor") is not None:
        vae["scaling_factor"] = float(params["scale_factor"])


def _read_text_encoders(params: dict, fam: dict, yaml_dir: Path):
    if params.get("cond_stage_config") is not None:
        embedders = [params["cond_stage_config"]]
    else:
        models = _params(params.get("conditioner_config")).get("emb_models") or []
        embedders = [e for e in models if isinstance(e, dict)
                     and (e.get("input_key") == "txt" or "CLIP" in _cls(e))]
    for emb, te in zip(embedders, fam["text_encoders"]):
        if _cls(emb) != "FrozenCLIPEmbedder":
            continue  # OpenCLIP towers: the caller sizes them from the weights
        version = _params(emb).get("version")
        folder = _local_folder(version, yaml_dir)
        if folder is None:
            continue  # a hub name such as openai/clip-vit-large-patch14: the base config is it
        te["config"].update(_clip_text_config(folder, te["config"]))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            te["tokenizer_dir"] = str(folder)


def _local_folder(version: Any, yaml_dir: Path) -> Optional[Path]:
    if not isinstance(version, str) or not version:
        return None
    folder = Path(version).expanduser()
    if not folder.is_absolute():
        folder = yaml_dir / folder
    return folder.resolve() if (folder / "config.json").is_file() else None


def _clip_text_config(folder: Path, current: dict) -> dict:
    """The text-model part of a local CLIP config.json, with transformers' defaults filled in."""
    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file} is not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else None
    if text is None and raw.get("model_type") == "clip":
        text = raw.get("text_config_dict") or {}  # very old CLIPConfig saves
    if text is None:
        text = raw
    text = dict(text)
    if "projection_dim" not in text and "projection_dim" in raw:
        text["projection_dim"] = raw["projection_dim"]
    # save_pretrained writes only what differs from the defaults: fill in the rest
    from transformers import CLIPTextConfig

    full = CLIPTextConfig(**{k: v for k, v in text.items() if k not in ("model_type", "architectures")}).to_dict()
    # sizes always; other keys (token ids, dropout) only where the file states them
    keys = set(TEXT_KEYS) | ((set(text) & set(current)) - {"architectures", "model_type"})
    return {k: full[k] for k in keys if k in full}


# ---------------------------------------------------------------- writing


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
