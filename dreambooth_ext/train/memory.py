"""Peak GPU memory of a training run, estimated before any work from the model's structure and the settings.

    est = estimate_memory(MemorySettings(family="sd1", train_mode="lora", resolution=512, ...))
    est = estimate_for_config(cfg)              # the same from a TrainConfig
    line = form_memory_note(form, checkpoint_path, gpu_gb)   # the tab's line beside Train
    est.total_gb, est.parts, est.summary()

What it adds up (bytes, at the step's peak):
- weights on the device: trained ones fp32, frozen ones in the mixed-precision dtype (as placement.py
  stores them); the VAE and a frozen text encoder only when their outputs are not cached;
- gradients (fp32, one per trained weight), optimizer states (per optimizer), EMA shadows (fp32);
- activations kept for the backward pass: per latent pixel, a number of bytes per channel for every
  ResNet block and every transformer block of the UNet (measured on the real SD1.5 blocks on the CPU
  under bf16 autocast: ACTIVATION_BYTES), summed over the UNet's levels from its config, so the
  same constants serve SD1, SD2, SDXL and the tiny test models. Prior preservation runs the class
  batch's forward pass beside the instance one, so it doubles them;
- during samples: the weights, states, VAE and text encoders, and the VAE decoder's activations.

What it does not count: the CUDA context (~0.3-0.5 GB outside torch's allocator) and fragmentation
(torch.cuda.memory_reserved runs ~5-15% above max_memory_allocated). Expected error against
torch.cuda.max_memory_allocated: EXPECTED_ERROR (CPU calibration; the GPU check prints the measured
figure beside every estimate).
"""

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from dreambooth_ext.train.optimizer_kinds import KINDS as OPTIMIZER_KINDS

# Expected error of the activation part (the CPU calibration's spread; until the GPU check measures it),
# and of the rest (weights, gradients, states: exact counts, but allocator rounding and small buffers).
EXPECTED_ERROR = 0.2
CHECKPOINTED_ERROR = 0.4  # with gradient checkpointing the backward pass's recompute peaks are less regular
REST_ERROR = 0.05
# Settings the estimate depends on: the tab refreshes its line when one of them changes.
MEMORY_SETTINGS = ("checkpoint", "family", "train_mode", "text_encoder_mode", "optimizer", "mixed_precision",
                   "resolution", "train_batch_size", "prior_loss_weight", "gradient_checkpointing",
                   "fused_backward_pass", "cache_latents", "cache_text_embeddings", "use_ema", "lora_rank",
                   "lora_targets", "sample_every")
MEMORY_CONCEPT_SETTINGS = ("class_prompt", "num_class_images")  # of each concept: prior preservation doubles the batch

GB = 1024**3
# Optimizer state bytes per trained parameter, as each optimizer declares it.
OPTIMIZER_BYTES = {kind.name: kind.state_bytes for kind in OPTIMIZER_KINDS}
# Activation bytes kept per channel and latent pixel, under bf16 autocast (fp32 doubles them).
# Measured on SD1.5's ResnetBlock2D and Transformer2DModel (bench/memory_calibrate.py prints them).
ACTIVATION_BYTES = {
    "resnet": 12.0,
    "transformer": 49.0,
    # with gradient checkpointing each checkpointed block keeps only its (half-precision) input
    "resnet_checkpointed": 2.0,
    "transformer_checkpointed": 2.0,
}
# Scale from the block measurements to a whole UNet (skip connections, samplers, backward transients),
# and with checkpointing, the recompute of the largest block in the backward pass as a multiple of its
# activations: fitted to the real SD1.5 UNet's growth from 128 to 256 px (bench/memory_calibrate.py).
WHOLE_UNET_FACTOR = 1.29
RECOMPUTE_FACTOR = 1.39
# A trained text encoder's activations per token and hidden unit of each layer, under bf16 autocast, one
# 77-token chunk per prompt, measured with LoRA adapters by torch's memory profiler on SD1's encoder (45) and
# SDXL's two (38). Checkpointed, the layers' kept inputs (0.75; fitted on the same two) and the recompute
# of the widest layer (TE_ACTIVATION_BYTES per its unit): `./run.sh bench memory_calibrate --text-encoders`.
TE_ACTIVATION_BYTES = 45.0
TE_KEPT_BYTES_CHECKPOINTED = 0.75
TE_TOKENS = 77
# Activations of autocast's half-precision copies of fp32 trained weights, kept for backward (bytes/param).
WEIGHT_COPY_BYTES = 2.0


@dataclass
class MemorySettings:
    family: str = "sd1"  # sd1 | sd2 | sd2-v | sdxl
    train_mode: str = "lora"  # full | lora
    text_encoder_mode: str = "frozen"  # frozen | full | lora
    optimizer: str = "adamw"
    mixed_precision: str = "bf16"  # no | fp16 | bf16 (resolved)
    resolution: int = 512
    batch_size: int = 1
    prior_preservation: bool = True
    gradient_checkpointing: bool = False
    fused_backward: bool = False  # each gradient freed once its weight is updated: no whole set of them
    cache_latents: bool = True
    cache_text_embeddings: bool = True
    use_ema: bool = False
    lora_rank: int = 16
    lora_targets: str = "attention"
    sampling: bool = True
    unet_config: Optional[dict] = None  # another UNet's config (tiny models); default: the family's


@dataclass
class MemoryEstimate:
    parts: Dict[str, float] = field(default_factory=dict)  # bytes at the training step's peak
    sampling_peak: float = 0.0  # bytes while sampling, 0 without samples
    error: float = EXPECTED_ERROR  # the expected relative error

    @property
    def training_peak(self) -> float:
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        return max(self.training_peak, self.sampling_peak)

    @property
    def total_gb(self) -> float:
        return self.total / GB

    @property
    def margin(self) -> float:
        """Bytes the peak may plausibly be above (or below) the estimate."""
        acts = self.parts.get("activations", 0.0)
        return self.error * acts + REST_ERROR * (self.total - acts)

    @property
    def upper_gb(self) -> float:
        return (self.total + self.margin) / GB

    def summary(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GB)
        return f"~{self.total_gb:.1f} GB peak GPU memory (+-{self.margin / GB:.1f}; {shown} GB)"


# Parameter counts of the shipped family configs (LoRA adapters per unit of rank, per target preset), and the
# fp32 values Adafactor keeps for the UNet and the text encoders trained in full (adafactor_state_count), so an
# estimate needs no model; tests/test_memory.py checks them against parameter_counts().
PARAMETERS = {
    "sd1": {"unet": 859520964, "vae": 83653863, "text_encoders": 123060480, "te_lora": 165888,
            "attention": 199296, "attention_ff": 423936, "attention_ff_conv": 1050816,
            "adafactor_unet": 457589700, "adafactor_text_encoders": 338253},
    "sd2": {"unet": 865910724, "vae": 83653863, "text_encoders": 340387840, "te_lora": 423936,
            "attention": 207488, "attention_ff": 432128, "attention_ff_conv": 1059008,
            "adafactor_unet": 408086212, "adafactor_text_encoders": 783693},
    "sdxl": {"unet": 2567463684, "vae": 83653863, "text_encoders": 817720320, "te_lora": 903168,
             "attention": 1451520, "attention_ff": 2659840, "attention_ff_conv": 3074240,
             "adafactor_unet": 244330500, "adafactor_text_encoders": 1665178},
}
PARAMETERS["sd2-v"] = PARAMETERS["sd2"]


def _counts(family: str, lora_targets: str, lora_rank: int) -> Dict[str, int]:
    table = PARAMETERS[family]
    return {"unet": table["unet"], "vae": table["vae"], "text_encoders": table["text_encoders"],
            "unet_lora": table[lora_targets] * lora_rank, "te_lora": table["te_lora"] * lora_rank,
            "adafactor_unet": table["adafactor_unet"], "adafactor_text_encoders": table["adafactor_text_encoders"]}


def adafactor_state_count(model) -> int:
    """fp32 values transformers' Adafactor (no first moment) keeps for a model's parameters: a tensor of two or
    more dimensions keeps a row and a column statistic over its last two dimensions, anything else a full copy.
    A 3x3 convolution's statistics are 2/3 of its size and a 1x1's twice it, which is why SD's UNets, heavy
    in convolutions, keep far more than the small share Adafactor is known for (SD1.5: 0.53 per weight)."""
    total = 0
    for p in model.parameters():
        shape = tuple(p.shape)
        total += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else p.numel()
    return total


@functools.lru_cache(maxsize=None)
def parameter_counts(family: str, lora_targets: str = "attention", lora_rank: int = 16) -> Dict[str, int]:
    """Parameters of the family's UNet, VAE, text encoders, and of the LoRA adapters a preset adds (meta tensors)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreambooth_ext.bridge.family_data import load_family, new_text_encoder
    from dreambooth_ext.train.lora import target_module_names

    fam = load_family(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(fam["unet"])
        vae = AutoencoderKL.from_config(fam["vae"])
        tes = [new_text_encoder(te)
               for te in fam["text_encoders"]]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet": count(unet), "vae": count(vae), "text_encoders": sum(count(t) for t in tes),
            "adafactor_unet": adafactor_state_count(unet),
            "adafactor_text_encoders": sum(adafactor_state_count(t) for t in tes),
            "unet_lora": _lora_count(unet, target_module_names(unet, lora_targets), lora_rank),
            "te_lora": sum(_lora_count(t, target_module_names(t, lora_targets, True), lora_rank) for t in tes)}


def _lora_count(model, names, rank: int) -> int:
    modules = dict(model.named_modules())
    total = 0
    for name in names:
        w = modules[name].weight
        fan_in = w.shape[1] * (w.shape[2] * w.shape[3] if w.dim() == 4 else 1)
        total += rank * (fan_in + w.shape[0])
    return total


def unet_units(config: dict) -> Dict[str, float]:
    """Channels x (fraction of the latent's pixels) summed over the UNet's ResNet and transformer blocks."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(channels)
    res = tr = big_res = big_tr = 0.0
    for level, (c, kind) in enumerate(zip(channels, config["down_block_types"])):
        scale = c / 4**level
        res += layers * scale
        big_res = max(big_res, scale)
        if "CrossAttn" in kind:
            tr += layers * depth[level] * scale
            big_tr = max(big_tr, scale)
    for i, kind in enumerate(config["up_block_types"]):
        level = len(channels) - 1 - i
        scale = channels[level] / 4**level
        res += (layers + 1) * scale
        if "CrossAttn" in kind:
            tr += (layers + 1) * depth[level] * scale
    deepest = channels[-1] / 4 ** (len(channels) - 1)
    res += 2 * deepest
    if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        tr += depth[-1] * deepest
    return {"resnet": res, "transformer": tr, "largest_resnet": big_res, "largest_transformer": big_tr}


def activation_bytes(config: dict, latent_pixels: int, batch: int, *, checkpointed: bool, half: bool) -> float:
    """Bytes the UNet keeps for its backward pass at `batch` samples of `latent_pixels` latent pixels."""
    units = unet_units(config)
    suffix = "_checkpointed" if checkpointed else ""
    per_pixel = (units["resnet"] * ACTIVATION_BYTES["resnet" + suffix]
                 + units["transformer"] * ACTIVATION_BYTES["transformer" + suffix])
    if checkpointed:  # the backward pass recomputes one block at a time: the largest one's full activations
        per_pixel += RECOMPUTE_FACTOR * max(units["largest_resnet"] * ACTIVATION_BYTES["resnet"],
                                            units["largest_transformer"] * ACTIVATION_BYTES["transformer"])
    else:
        per_pixel *= WHOLE_UNET_FACTOR
    return per_pixel * latent_pixels * batch * (1.0 if half else 2.0)


def text_encoder_activation_bytes(te_configs, prompts: int, *, checkpointed: bool, half: bool) -> float:
    """Bytes trained text encoders keep for their backward pass, for `prompts` encoded prompts of one chunk."""
    units = sum(c["num_hidden_layers"] * c["hidden_size"] for c in te_configs) * TE_TOKENS * prompts
    if checkpointed:
        widest = max(c["hidden_size"] for c in te_configs) * TE_TOKENS * prompts
        kept = TE_KEPT_BYTES_CHECKPOINTED * units + TE_ACTIVATION_BYTES * widest
    else:
        kept = TE_ACTIVATION_BYTES * units
    return kept * (1.0 if half else 2.0)


def expected_error(checkpointed: bool) -> float:
    return CHECKPOINTED_ERROR if checkpointed else EXPECTED_ERROR


def _vae_decode_bytes(resolution: int, half_vae: bool) -> float:
    # the decoder's last levels hold a few 128-channel full-size tensors at once (plus fp32 norms)
    return 6 * 128 * resolution * resolution * (2 if half_vae else 4)


def estimate_memory(s: MemorySettings) -> MemoryEstimate:
    from dreambooth_ext.bridge.family_data import load_family

    n = _counts(s.family, s.lora_targets, s.lora_rank)
    half = s.mixed_precision in ("fp16", "bf16")
    frozen_b = 2 if half else 4
    vae_b = 4 if s.mixed_precision in ("no", "fp16") else 2
    full, te_full, te_lora = s.train_mode == "full", s.text_encoder_mode == "full", s.text_encoder_mode == "lora"
    trained = (n["unet"] if full else n["unet_lora"]) + (n["text_encoders"] if te_full else 0) + (n["te_lora"] if te_lora else 0)
    te_on_device = s.text_encoder_mode != "frozen" or not s.cache_text_embeddings
    weights = n["unet"] * (4 if full else frozen_b) + (0 if full else 4 * n["unet_lora"])
    weights += (n["text_encoders"] * (4 if te_full else frozen_b) + 4 * (n["te_lora"] if te_lora else 0)) if te_on_device else 0
    weights += 0 if s.cache_latents else n["vae"] * vae_b
    family = load_family(s.family)
    config = s.unet_config or family["unet"]
    latent_pixels = (s.resolution // 8) ** 2
    batch = s.batch_size * (2 if s.prior_preservation else 1)
    acts = activation_bytes(config, latent_pixels, batch, checkpointed=s.gradient_checkpointing, half=half)
    if s.text_encoder_mode != "frozen":  # the prompts go through the trained encoders with their gradients
        acts += text_encoder_activation_bytes([te["config"] for te in family["text_encoders"]], batch,
                                              checkpointed=s.gradient_checkpointing, half=half)
    # autocast's half copies of fp32 trained weights: kept for backward, and cached through a sample's
    # denoising loop, unless checkpointing releases them layer by layer (train/checkpointing.py)
    copies = 0.0 if s.gradient_checkpointing or not half else WEIGHT_COPY_BYTES * (
        (n["unet"] if full else 0) + (n["text_encoders"] if te_full else 0))
    acts += copies
    parts = {"weights": float(weights), "gradients": 0.0 if s.fused_backward else 4.0 * trained,
             "optimizer": _optimizer_bytes(s, n, trained),
             "ema": 4.0 * trained if s.use_ema else 0.0, "activations": acts}
    est = MemoryEstimate(parts, error=expected_error(s.gradient_checkpointing))
    if s.sampling:
        resident = parts["weights"] + parts["optimizer"] + parts["ema"]
        resident += (0 if te_on_device else n["text_encoders"] * frozen_b) + (n["vae"] * vae_b if s.cache_latents else 0)
        est.sampling_peak = resident + copies + _vae_decode_bytes(s.resolution, vae_b == 2)
    return est


def _optimizer_bytes(s: MemorySettings, n: Dict[str, int], trained: int) -> float:
    if s.optimizer != "adafactor":
        return OPTIMIZER_BYTES.get(s.optimizer, 8.0) * trained
    # Adafactor's statistics follow the shapes: counted for whole models, about 1/rank of a LoRA adapter
    full_te = s.text_encoder_mode == "full"
    whole = (n["adafactor_unet"] if s.train_mode == "full" else 0) + (n["adafactor_text_encoders"] if full_te else 0)
    adapters = (n["unet_lora"] if s.train_mode == "lora" else 0) + (n["te_lora"] if s.text_encoder_mode == "lora" else 0)
    return 4.0 * whole + 4.0 / max(1, s.lora_rank) * adapters


def settings_from_config(cfg, family: Optional[str] = None, mode: Optional[str] = None) -> MemorySettings:
    """The estimator's view of a TrainConfig; `mode` is the resolved mixed precision (default: bf16 for auto)."""
    fam = family or (cfg.family if cfg.family != "auto" else "sd1")
    prior = cfg.prior_loss_weight > 0 and any(c.class_prompt.strip() and c.num_class_images > 0 for c in cfg.concepts)
    mp = mode or ("bf16" if cfg.mixed_precision == "auto" else cfg.mixed_precision)
    return MemorySettings(
        family=fam, train_mode=cfg.train_mode, text_encoder_mode=cfg.text_encoder_mode, optimizer=cfg.optimizer,
        mixed_precision=mp, resolution=cfg.resolution, batch_size=cfg.train_batch_size, prior_preservation=prior,
        gradient_checkpointing=cfg.gradient_checkpointing, fused_backward=cfg.fused_backward_pass,
        cache_latents=cfg.cache_latents,
        cache_text_embeddings=cfg.cache_text_embeddings, use_ema=cfg.use_ema, lora_rank=cfg.lora_rank,
        lora_targets=cfg.lora_targets, sampling=bool(cfg.sample_every))


def estimate_for_config(cfg, family: Optional[str] = None, mode: Optional[str] = None) -> MemoryEstimate:
    return estimate_memory(settings_from_config(cfg, family, mode))


def family_of(checkpoint: str, setting: str = "auto") -> str:
    """The family to estimate for: the setting, else what the checkpoint file's tensor shapes say, else sd1."""
    if setting and setting != "auto":
        return setting
    try:
        from pathlib import Path

        from dreambooth_ext.bridge.detect import detect_family
        from dreambooth_ext.bridge.tensor_io import open_checkpoint

        path = Path(checkpoint or "")
        if path.is_file() and path.suffix == ".safetensors":  # a header read; a pickle would need loading
            return detect_family(open_checkpoint(path).shapes(), path.name).family
    except Exception:  # noqa: BLE001 - unreadable: the estimate falls back, training will say why
        pass
    return "sd1"


def form_memory_note(form: dict, checkpoint_path: str, gpu_gb: Optional[float]) -> str:
    """The tab's line beside Train, from the form's values (setting name -> value; concepts may be incomplete)."""
    try:
        fam = family_of(checkpoint_path, str(form.get("family") or "auto"))
        prior = float(form.get("prior_loss_weight") or 0) > 0 and any(  # as settings_from_config counts it
            str(v).strip() and float(form.get(k[:-len("class_prompt")] + "num_class_images", 100) or 0) > 0
            for k, v in form.items() if k.endswith(".class_prompt"))
        mp = str(form.get("mixed_precision") or "auto")
        s = MemorySettings(
            family=fam, train_mode=str(form.get("train_mode", "lora")),
            text_encoder_mode=str(form.get("text_encoder_mode", "frozen")), optimizer=str(form.get("optimizer", "adamw")),
            mixed_precision="bf16" if mp == "auto" else mp, resolution=int(form.get("resolution") or 512),
            batch_size=int(form.get("train_batch_size") or 1), prior_preservation=prior,
            gradient_checkpointing=bool(form.get("gradient_checkpointing")),
            fused_backward=bool(form.get("fused_backward_pass")), cache_latents=bool(form.get("cache_latents", True)),
            cache_text_embeddings=bool(form.get("cache_text_embeddings", True)), use_ema=bool(form.get("use_ema")),
            lora_rank=int(form.get("lora_rank") or 16), lora_targets=str(form.get("lora_targets") or "attention"),
            sampling=bool(form.get("sample_every")))
        est = estimate_memory(s)
    except Exception as e:  # noqa: BLE001 - an estimate must never break the tab
        return f"Memory estimate unavailable ({e})."
    line = f"{fam}: estimated {est.summary()}."
    if gpu_gb is not None and est.upper_gb > gpu_gb:
        line = (f"Warning: {line} That may not fit the GPU's {gpu_gb:g} GB: use Recommended settings, or turn on "
                "gradient checkpointing, LoRA or 8-bit AdamW.")
    return line
