"""The typed training config: every setting declared once, with its type, default, range and help.

The CLI, a JSON config file and the gradio tab all read the same fields. A UI walks
`describe()` (or `dataclasses.fields`) to build its form; nothing here imports gradio.

    cfg = load_config("cfg.json")          # config_io: or load_config({...}); coerces types, refuses unknown keys
    cfg, warnings = validate(cfg)          # config_checks: a normalised copy; UserError for the first hard error
    save_config(cfg, "cfg.json")           # config_io: exact round trip

Paths left empty get defaults from the models folder (see `workspace_path` and `class_path`):
the workspace is `<models_dir>/dreambooth/<name>`, beside the WebUI's own model folders, so a
run's class images, samples and resumable state live with the models it writes.
"""

import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from dreambooth_ext.train.optimizer_kinds import NAMES as OPTIMIZERS

GROUPS = ("model", "concepts", "class images", "training", "optimizer", "lora", "text encoder",
          "memory & speed", "samples", "saving")

FAMILIES = ("auto", "sd1", "sd2", "sd2-v", "sdxl")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LORA_TARGETS = ("attention", "attention_ff", "attention_ff_conv")
CAPTION_MODES = ("prompt", "filewords", "caption")
FILEWORDS = "[filewords]"
# settings that once existed: a saved config or training state that holds one still loads, the value ignored
RETIRED = frozenset({"dataloader_workers"})  # read by nothing: images are read in the main process


def setting(default: Any, help: str, group: str, *, min: Optional[float] = None, max: Optional[float] = None,
            choices: Optional[typing.Sequence[str]] = None, multiple_of: Optional[int] = None, path: bool = False,
            resumable: bool = False):
    """A dataclass field carrying what a CLI or a form needs to show and check it.

    Every user of a setting reads these from the declaration (`choices_of`, `declared`), so a new
    setting is offered, checked and kept on resume without anyone listing it again:
    choices: the values allowed (the CLI's and the form's choices, the checks' message).
    path=True: the value names a file or folder the run reads or writes (the API keeps those inside the
    host's folders).
    resumable=True: the value may change between an interrupted run and its resumption, as it does not
    change what the steps compute (when to sample or save, where results go, memory and speed), beyond
    rounding (another attention kernel) or on purpose (max_steps: a longer run, whose decaying learning-rate
    schedule then spans the new length; the resumed run says so)."""
    meta = {"help": help, "group": group, "min": min, "max": max,
            "choices": list(choices) if choices else None, "multiple_of": multiple_of, "path": path,
            "resumable": resumable}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Concept:
    """One subject or style: its images, the prompt that names it, and its class for prior preservation."""

    instance_dir: str = setting("", "Folder with the 5-50 pictures of the subject or style.", "concepts", path=True)
    instance_prompt: str = setting(
        "", "Prompt naming the concept with a rare token, e.g. 'a photo of sks_pixarstyle character'; "
        "may contain [filewords].", "concepts")
    caption_mode: str = setting(
        "prompt", "prompt: the instance prompt alone; filewords: the .txt beside each image replaces "
        "[filewords] in the prompt; caption: the .txt replaces the prompt (images without one use the prompt).",
        "concepts", choices=CAPTION_MODES)
    instance_token: str = setting(
        "", "The token the concept is learned under, when it is a real word the rare-token check "
        "would miss (empty: found from the prompts).", "concepts")
    class_prompt: str = setting(
        "", "Prompt for the concept's class without the token, e.g. 'a pixar-style character' "
        "(empty: no prior preservation for this concept).", "class images")
    class_dir: str = setting(
        "", "Folder of class images; missing ones are generated with the base model and kept "
        "(empty: a folder in the workspace named after the class prompt).", "class images", path=True)
    num_class_images: int = setting(
        100, "Class images used for prior preservation (diffusers' default is 100; 0 = none).",
        "class images", min=0, max=10000)
    class_steps: int = setting(0, "Sampling steps for this concept's class images (0 = the run's class image "
                               "steps).", "class images", min=0, max=200)
    class_guidance: float = setting(0.0, "CFG scale for this concept's class images (0 = the run's class image "
                                    "guidance).", "class images", min=0, max=30)
    class_negative_prompt: str = setting("", "Negative prompt for this concept's class images (empty = the run's "
                                         "class image negative prompt).", "class images")
    concept_sample_prompts: List[str] = setting(
        [], "Sample prompts of this concept, sampled after its instance prompt along with the run's own.", "samples",
        resumable=True)


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults follow diffusers' train_dreambooth.py and kohya's sd-scripts."""

    # model
    checkpoint: str = setting("", "Source model: a WebUI checkpoint (.safetensors/.ckpt) or a diffusers folder.", "model",
                          path=True)
    name: str = setting("", "Name of the new model; files are written as NAME_<step>.safetensors.", "model")
    models_dir: str = setting(
        "models", "The WebUI's models folder; checkpoints go to its Stable-diffusion/, LoRAs to its Lora/.", "model",
        path=True, resumable=True)
    checkpoint_dir: str = setting(
        "", "Where new checkpoints go (empty: MODELS_DIR/Stable-diffusion; the WebUI passes its --ckpt-dir).", "model",
        path=True, resumable=True)
    lora_dir: str = setting(
        "", "Where new LoRA files go (empty: MODELS_DIR/Lora; the WebUI passes its --lora-dir).", "model", path=True,
        resumable=True)
    workspace_dir: str = setting(
        "", "Folder for class images, samples and resumable state (empty: MODELS_DIR/dreambooth/NAME).", "model",
        path=True)
    family: str = setting(
        "auto", "Model family; auto reads it from the checkpoint. Use sd2-v for 768-v SD2 models, "
        "whose weights cannot tell.", "model", choices=FAMILIES)

    # concepts
    concepts: List[Concept] = setting([], "The subjects or styles to teach, each with its own images and prompts.",
                                      "concepts")

    # class images
    class_image_steps: int = setting(30, "Sampling steps per generated class image.", "class images", min=1, max=200)
    class_image_guidance: float = setting(7.0, "CFG scale for generated class images.", "class images", min=0, max=30)
    class_image_batch_size: int = setting(4, "Class images generated at once; lower it if generation runs out of memory.",
                                          "class images", min=1, max=64)
    class_image_negative_prompt: str = setting("", "Negative prompt for generated class images.", "class images")
    class_image_generator: str = setting(
        "builtin", "builtin: class images from the extension's own diffusers sampler; webui: from the WebUI's own "
        "txt2img (its sampler, VAE and settings, with the base checkpoint), only inside the WebUI.", "class images",
        choices=("builtin", "webui"))

    # training
    train_mode: str = setting("full", "full: train the whole UNet (a new checkpoint); lora: train small LoRA "
                              "adapters (a file for the Lora folder, far less memory).", "training",
                              choices=("full", "lora"))
    resolution: int = setting(512, "Training resolution in pixels (SD1 and SD2 512, SD2 768-v 768, SDXL 1024).",
                              "training", min=64, max=4096, multiple_of=8)
    max_steps: int = setting(800, "Optimizer steps to train; about 100-200 per instance image is typical.",
                             "training", min=1, max=1_000_000, resumable=True)
    max_epochs: int = setting(
        0, "Train this many epochs instead of max_steps (one epoch = every instance image once; the tab shows "
        "the steps per epoch); 0 = use max_steps.", "training", min=0, max=100_000, resumable=True)
    train_batch_size: int = setting(1, "Images per step (instance and class images are each this many).",
                                    "training", min=1, max=64)
    gradient_accumulation_steps: int = setting(
        1, "Batches added up before each optimizer step: a larger effective batch with the memory of one.",
        "training", min=1, max=256)
    seed: int = setting(1234, "Random seed; the same seed and settings give the same run.", "training",
                        min=0, max=2**32 - 1)
    prior_loss_weight: float = setting(
        1.0, "Weight of the class-image loss (prior preservation): keeps the class from turning into the "
        "concept; 0 turns it off.", "training", min=0, max=10)
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting gamma (5 is the paper's value); 0 = off.",
                                   "training", min=0, max=100)
    offset_noise: float = setting(0.0, "Offset noise strength (0.05-0.1 helps very dark or bright images); 0 = off.",
                                  "training", min=0, max=1)
    shuffle_tags: bool = setting(
        False, "Shuffle the comma-separated tags of each instance caption at every step (kohya's "
        "--shuffle_caption); the first keep_tokens tags stay in place.", "training")
    keep_tokens: int = setting(1, "Leading tags of a caption that shuffle_tags keeps in place (the instance "
                               "token usually comes first).", "training", min=0, max=255)
    caption_dropout: float = setting(
        0.0, "Share of instance images trained with an empty caption (kohya's --caption_dropout_rate; 0.05-0.1 "
        "keeps the model usable without the token); 0 = off.", "training", min=0, max=1)
    bucketing: bool = setting(True, "Group images by aspect ratio instead of cropping every image square.", "training")
    bucket_step: int = setting(64, "Bucket sizes are multiples of this many pixels.", "training",
                               min=8, max=256, multiple_of=8)
    bucket_upscale: bool = setting(False, "Let bucketing upscale images smaller than the training resolution "
                                   "(off: small images keep their size).", "training")
    center_crop: bool = setting(True, "Crop the centre of each image (off: a random crop each time).", "training")
    hflip: bool = setting(False, "Randomly mirror images; leave off for asymmetric subjects or text.", "training")
    use_ema: bool = setting(False, "Keep an exponential moving average of the trained weights and save it "
                            "(smoother results, one more copy of the weights in memory).", "training")
    ema_decay: float = setting(0.9999, "EMA decay: the closer to 1, the more steps the average spans.",
                               "training", min=0, max=1)

    # optimizer
    optimizer: str = setting("adamw", "adamw; adamw8bit and lion8bit need bitsandbytes (less memory); adafactor "
                             "(little memory); prodigy (finds its own step size: use learning rate 1.0).",
                             "optimizer", choices=OPTIMIZERS)
    learning_rate: float = setting(2e-6, "UNet learning rate for full training (1e-6 to 5e-6 is usual).",
                                   "optimizer", min=0, max=10)
    lora_learning_rate: float = setting(1e-4, "UNet learning rate for LoRA training (used instead of learning_rate).",
                                        "optimizer", min=0, max=10)
    adam_beta1: float = setting(0.9, "First-moment decay of Adam-style optimizers (Lion too).", "optimizer", min=0, max=1)
    adam_beta2: float = setting(0.999, "Second-moment decay of Adam-style optimizers (Lion: 0.99 is usual).",
                                "optimizer", min=0, max=1)
    adam_epsilon: float = setting(1e-8, "Adam's epsilon.", "optimizer", min=0, max=1)
    weight_decay: float = setting(1e-2, "Decoupled weight decay.", "optimizer", min=0, max=10)
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm; 0 = no clipping.", "optimizer", min=0, max=1000)
    lr_scheduler: str = setting("constant", "How the learning rate changes over the run.", "optimizer",
                                choices=SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Steps over which the learning rate ramps up from 0 (not used by 'constant').",
                                   "optimizer", min=0, max=1_000_000)
    lr_num_cycles: int = setting(1, "Restarts of cosine_with_restarts.", "optimizer", min=1, max=1000)
    lr_power: float = setting(1.0, "Power of the polynomial schedule (1 = linear decay).", "optimizer", min=0, max=10)

    # lora
    lora_rank: int = setting(16, "LoRA rank: capacity of the adapters and size of the file.", "lora", min=1, max=256)
    lora_alpha: float = setting(0.0, "LoRA alpha; the update is scaled by alpha/rank (0 = same as the rank).",
                                "lora", min=0, max=1024)
    lora_targets: str = setting("attention", "Layers that get adapters: attention (diffusers' default), "
                                "attention_ff adds feed-forward (more capacity, good for styles), "
                                "attention_ff_conv adds convolutions.", "lora", choices=LORA_TARGETS)
    init_lora: str = setting("", "Start from an earlier LoRA file, to train in phases (empty: fresh adapters).", "lora",
                              path=True)

    # text encoder
    text_encoder_mode: str = setting(
        "frozen", "frozen (least memory, embeddings cacheable); full (better likeness of faces, much more memory); "
        "lora (adapters on the text encoder too).", "text encoder", choices=("frozen", "full", "lora"))
    text_encoder_lr: float = setting(1e-6, "Text encoder learning rate when it is trained fully.", "text encoder",
                                     min=0, max=10)
    text_encoder_lora_lr: float = setting(5e-5, "Text encoder learning rate when it gets LoRA adapters.",
                                          "text encoder", min=0, max=10)
    text_encoder_stop_step: int = setting(0, "Step after which the text encoder stops training (0 = never stops); "
                                          "it overfits sooner than the UNet.", "text encoder", min=0, max=1_000_000)

    max_prompt_tokens: int = setting(
        75, "Longest prompt or caption read, in tokens: 150 or 225 read longer captions in chunks of 75, the way "
        "the WebUI reads long prompts in txt2img (training, samples and class images alike); longer ones are cut "
        "with a warning.", "text encoder", min=75, max=225, multiple_of=75)
    clip_skip: int = setting(
        1, "The WebUI's 'Clip skip' (stop at last layers): 1 = the last layer, 2 = the penultimate, as many "
        "anime SD1 models expect. SD1 only: SD2 and SDXL have their own fixed layer. In the WebUI the tab starts "
        "from its live setting.", "text encoder", min=1, max=12)
    prompt_weighting: bool = setting(
        False, "Read emphasis and BREAK in captions, prompts, sample prompts and class prompts as the WebUI's txt2img "
        "does: (word) x1.1, [word] /1.1, (word:1.5), \\( for a bracket, BREAK to start a new 75-token chunk. Off: "
        "brackets and BREAK are plain text (kohya's default). Use it when captions carry weights the way your "
        "txt2img prompts will.", "text encoder")

    # memory & speed
    mixed_precision: str = setting("auto", "auto: bf16 where the GPU supports it, else fp16 with loss scaling; "
                                   "fp32 on a CPU.", "memory & speed", choices=("auto", "no", "fp16", "bf16"))
    attention: str = setting("auto", "auto: xformers when importable on CUDA, else PyTorch SDPA.", "memory & speed",
                             choices=("auto", "xformers", "sdpa", "default"), resumable=True)
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: much less memory, "
                                           "about 25% slower.", "memory & speed", resumable=True)
    fused_backward_pass: bool = setting(
        False, "Update each weight as soon as its gradient is ready and free that gradient, so the gradients of "
        "the whole model never exist at once: saves one fp32 copy of the trained weights (3.4 GB for a full SD1.5 "
        "UNet). The same steps without clipping; with max_grad_norm each tensor is clipped on its own. Needs "
        "gradient_accumulation_steps 1, bf16 or no mixed precision, one GPU, and not Prodigy.", "memory & speed")
    cache_latents: bool = setting(True, "Encode each image with the VAE once instead of at every step "
                                  "(much faster, little memory).", "memory & speed")
    cache_text_embeddings: bool = setting(True, "Encode each prompt once; only while the text encoder is frozen.",
                                          "memory & speed", resumable=True)

    # samples
    sample_every: int = setting(0, "Generate samples every this many steps (0 = off; 200 is a good value).",
                                "samples", min=0, max=1_000_000, resumable=True)
    sample_prompts: List[str] = setting([], "Extra sample prompts; each concept's instance prompt is always sampled.",
                                        "samples", resumable=True)
    sample_negative_prompt: str = setting("", "Negative prompt for samples.", "samples", resumable=True)
    sample_seeds: List[int] = setting([], "One seed per sample image, the same at every sampling; missing ones "
                                      "count up from the last given (or from seed).", "samples", resumable=True)
    num_sample_images: int = setting(2, "Sample images per prompt.", "samples", min=1, max=16, resumable=True)
    sample_steps: int = setting(20, "Sampling steps per sample image.", "samples", min=1, max=200, resumable=True)
    sample_guidance: float = setting(7.0, "CFG scale for samples.", "samples", min=0, max=30, resumable=True)
    monitor_clip_model: str = setting(
        "", "Folder of a CLIP model on disk (a snapshot of openai/clip-vit-large-patch14 or the like, with its "
        "config.json): the training monitor then also scores each sample step with CLIP-I, CLIP-T and the class's "
        "CLIP similarity to the base, and picks its best step by CLIP-I; never downloaded (empty: latent "
        "distances only).", "samples", path=True, resumable=True)

    # saving
    save_model_every: int = setting(0, "Write the model every this many steps as NAME_<step> (0 = only at the end).",
                                    "saving", min=0, max=1_000_000, resumable=True)
    save_state_every: int = setting(0, "Save resumable training state every this many steps and at the end (0 = only "
                                    "when stopped, or when the model cannot be written); full training states are "
                                    "large (about 3x the model).", "saving",
                                    min=0, max=1_000_000, resumable=True)
    save_format: str = setting("safetensors", "File format; .ckpt is a pickle, prefer safetensors.", "saving",
                               choices=("safetensors", "ckpt"), resumable=True)
    save_dtype: str = setting("fp16", "Precision of the written weights (fp16 halves the file; the WebUI runs it "
                              "the same).", "saving", choices=("fp16", "bf16", "fp32"), resumable=True)
    save_lora_merged: bool = setting(False, "With LoRA training, also write a full checkpoint with the LoRA "
                                     "merged in.", "saving", resumable=True)
    save_model_on_interrupt: bool = setting(
        False, "When the run is interrupted, write the model as it is then (NAME_<step>), as well as the "
        "resumable state.", "saving", resumable=True)
    keep_last_models: int = setting(
        0, "Keep only the newest this many saved models of the run (each save's LoRA, checkpoint and yaml); "
        "older ones the run wrote are deleted, files it did not write never are (0 = keep all).", "saving",
        min=0, max=10000, resumable=True)

    @property
    def unet_learning_rate(self) -> float:
        return self.lora_learning_rate if self.train_mode == "lora" else self.learning_rate

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.text_encoder_lora_lr if self.text_encoder_mode == "lora" else self.text_encoder_lr

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha or float(self.lora_rank)

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.models_dir) / "Stable-diffusion"

    def lora_path(self) -> Path:
        return Path(self.lora_dir) if self.lora_dir else Path(self.models_dir) / "Lora"

    def workspace_path(self) -> Path:
        return Path(self.workspace_dir) if self.workspace_dir else Path(self.models_dir) / "dreambooth" / self.name

    def class_path(self, concept: Concept) -> Path:
        """The concept's class folder; the default is keyed by the class prompt, so concepts sharing one share images."""
        if concept.class_dir:
            return Path(concept.class_dir)
        slug = re.sub(r"[^a-z0-9]+", "_", concept.class_prompt.lower()).strip("_")[:48] or "class"
        from dreambooth_ext.train.derived import prompt_hash

        return self.workspace_path() / "class_images" / f"{slug}_{prompt_hash(concept.class_prompt)}"


# ---------------------------------------------------------------------------------------------
# Introspection for forms


@dataclass(frozen=True)
class SettingInfo:
    name: str
    kind: str  # bool | int | float | str | list[str] | list[int] | concepts
    default: Any
    help: str
    group: str
    min: Optional[float]
    max: Optional[float]
    choices: Optional[List[str]]
    multiple_of: Optional[int]
    path: bool = False  # names a file or folder (see setting())
    resumable: bool = False  # may change when an interrupted run resumes (see setting())


def type_hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(tp) -> str:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return "concepts" if item is Concept else f"list[{item.__name__}]"
    return tp.__name__


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def describe(cls=TrainConfig) -> List[SettingInfo]:
    """The settings of TrainConfig (or Concept) in declaration order, for building a form."""
    hints = type_hints(cls)
    return [SettingInfo(f.name, _kind(hints[f.name]), default_of(f), f.metadata["help"], f.metadata["group"],
                        f.metadata["min"], f.metadata["max"], f.metadata["choices"], f.metadata["multiple_of"],
                        f.metadata.get("path", False), f.metadata.get("resumable", False))
            for f in fields(cls)]


def declared(flag: str, cls=TrainConfig) -> List[str]:
    """Names of the settings of TrainConfig (or Concept) declared with `flag`=True ("path" or "resumable")."""
    return [f.name for f in fields(cls) if f.metadata.get(flag)]


def choices_of(name: str, cls=TrainConfig) -> typing.Tuple[str, ...]:
    """The values setting `name` of TrainConfig (or Concept) is declared to allow."""
    f = next((f for f in fields(cls) if f.name == name), None)
    if f is None or not f.metadata.get("choices"):
        raise KeyError(f"{cls.__name__} has no setting '{name}' with choices")
    return tuple(f.metadata["choices"])
