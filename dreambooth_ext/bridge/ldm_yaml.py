"""WebUI/LDM yaml <-> family dict.

A WebUI checkpoint may come with NAME.yaml beside it: the config the WebUI instantiates the
model from (Stability's `ldm` repo for SD1/SD2, `sgm` from generative-models for SDXL).
`parse_yaml` reads such a file into a family dict (the shape of data/families/*.json) without
instantiating anything; `ldm_yaml_write.generate_yaml` writes one for a family dict.
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
