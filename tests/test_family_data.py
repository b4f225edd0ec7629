"""The shipped family configs build the published architectures (checked on the meta device)."""

import inspect
import json

import diffusers
import pytest
import torch
import transformers

from dreambooth_ext.bridge.family_data import FAMILIES_DIR, FAMILY_NAMES, load_family

# Published parameter counts. CLIP text counts include the token and position embeddings.
UNET_SD1 = 859_520_964
UNET_SD2 = 865_910_724  # 1024-wide cross-attention k/v instead of 768
UNET_SDXL = 2_567_463_684
VAE = 83_653_863  # same autoencoder in every family
CLIP_L = 123_060_480  # ViT-L/14 text: 12 x 7,087,872 + 49408*768 + 77*768 + final LN
CLIP_H_23 = 340_387_840  # OpenCLIP ViT-H text, 23 of 24 layers: 23 x 12,596,224 + embeddings + LN
CLIP_G_PROJ = 694_659_840  # OpenCLIP bigG text, 32 layers, + 1280x1280 text_projection

EXPECTED = {
    "sd1": (UNET_SD1, [CLIP_L]),
    "sd2": (UNET_SD2, [CLIP_H_23]),
    "sd2-v": (UNET_SD2, [CLIP_H_23]),
    "sdxl": (UNET_SDXL, [CLIP_L, CLIP_G_PROJ]),
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_args(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    return request.param


def test_clip_counts_by_hand():
    # The text-encoder constants above, re-derived from the architecture.
    def clip(width, layers, vocab=49408, positions=77, projection=0):
        attn = 4 * (width * width + width)
        mlp = 2 * width * 4 * width + 4 * width + width
        norms = 2 * 2 * width
        return layers * (attn + mlp + norms) + (vocab + positions) * width + 2 * width + projection

    assert clip(768, 12) == CLIP_L
    assert clip(1024, 23) == CLIP_H_23
    assert clip(1280, 32, projection=1280 * 1280) == CLIP_G_PROJ


def test_files_match_names():
    assert sorted(p.stem for p in FAMILIES_DIR.glob("*.json")) == sorted(FAMILY_NAMES)


def test_load_family_returns_a_copy():
    first = load_family("sd1")
    first["unet"]["sample_size"] = -1
    first["text_encoders"][0]["config"]["hidden_size"] = -1
    again = load_family("sd1")
    assert again["unet"]["sample_size"] == 64
    assert again["text_encoders"][0]["config"]["hidden_size"] == 768


def test_unknown_family_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_family("sd3")
    for name in FAMILY_NAMES:
        assert name in str(info.value)


def test_shape_and_keys(family):
    data = load_family(family)
    assert data["family"] == family
    assert set(data) == {"family", "description", "pipeline", "unet", "vae", "text_encoders", "scheduler"}
    assert data["pipeline"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert hasattr(diffusers, data["pipeline"])
    # Every key must be a real constructor argument: a typo would otherwise be dropped silently.
    assert set(data["unet"]) <= init_args(diffusers.UNet2DConditionModel)
    assert set(data["vae"]) <= init_args(diffusers.AutoencoderKL)
    scheduler = dict(data["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler.pop("_class_name"))
    assert set(scheduler) <= init_args(scheduler_cls)
    for encoder in data["text_encoders"]:
        assert set(encoder) == {"class", "config", "tokenizer_pad"}
        assert encoder["config"]["architectures"] == [encoder["class"]]
        assert encoder["tokenizer_pad"] in ("<|endoftext|>", "!")
        config = transformers.CLIPTextConfig(**encoder["config"])
        dumped = config.to_dict()
        for key, value in encoder["config"].items():
            assert dumped[key] == value, key
    # The file is plain JSON, without NaN or other non-standard values.
    with open(FAMILIES_DIR / f"{family}.json", encoding="utf-8") as f:
        json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


def test_scheduler(family):
    data = load_family(family)
    scheduler_cfg = data["scheduler"]
    scheduler = getattr(diffusers, scheduler_cfg["_class_name"]).from_config(scheduler_cfg)
    expected_class = {
        "sd1": "PNDMScheduler",
        "sd2": "PNDMScheduler",
        "sd2-v": "DDIMScheduler",
        "sdxl": "EulerDiscreteScheduler",
    }[family]
    assert type(scheduler).__name__ == expected_class
    cfg = scheduler.config
    assert cfg.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.num_train_timesteps == 1000
    assert cfg.steps_offset == 1


def test_architectures_on_meta(family):
    data = load_family(family)
    unet_expected, text_expected = EXPECTED[family]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**data["unet"])
        vae = diffusers.AutoencoderKL(**data["vae"])
        encoders = [
            getattr(transformers, enc["class"])(transformers.CLIPTextConfig(**enc["config"]))
            for enc in data["text_encoders"]
        ]
    assert n_params(unet) == unet_expected
    assert n_params(vae) == VAE
    assert [n_params(e) for e in encoders] == text_expected
    assert all(p.is_meta for p in unet.parameters())

    # Facts that parameter counts cannot see.
    first_attn = next(m for m in unet.modules() if isinstance(m, diffusers.models.attention.BasicTransformerBlock))
    proj_in = next(m for n, m in unet.named_modules() if n.endswith("attentions.0.proj_in"))
    if family == "sd1":
        assert first_attn.attn1.heads == 8
        assert isinstance(proj_in, torch.nn.Conv2d)
    elif family in ("sd2", "sd2-v"):
        assert first_attn.attn1.heads == 5  # 320 / 5 = head dim 64
        assert isinstance(proj_in, torch.nn.Linear)
    else:
        assert first_attn.attn1.heads == 10  # first attention is at 640 wide
        assert isinstance(proj_in, torch.nn.Linear)
    assert first_attn.attn1.upcast_attention == (family == "sd2-v")
    latent = {"sd1": 64, "sd2": 64, "sd2-v": 96, "sdxl": 128}[family]
    assert unet.config.sample_size == latent
    assert vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert unet.config.cross_attention_dim == sum(e["config"]["hidden_size"] for e in data["text_encoders"])
