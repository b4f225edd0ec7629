"""The CPU standing in for a GPU's dtype layout: frozen modules bf16, bf16 autocast, trained weights fp32.

On a plain CPU run every module is fp32, so a dtype mistake (half latents meeting a fp32 UNet, fp32
latents meeting a bf16 VAE) cannot show. DREAMBOOTH_EMULATE_GPU_DTYPES=bf16 gives the CPU the layout
a GPU run has; these runs go through class images, samples at every step, EMA and saving.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dreambooth_ext.train.models as models
from dreambooth_ext.errors import UserError
from dreambooth_ext.train import lora as lora_lib
from dreambooth_ext.train.placement import EMULATE_ENV, decide_placement
from dreambooth_ext.train.run import train
from tests.recording import RecordingReporter
from tests.trainer_helpers import TOKEN_PROMPT, capture_bundles, small_config

BF16, FP32 = torch.bfloat16, torch.float32


class _DtypeWatch(RecordingReporter):
    """Records the dtypes of the modules at the first training step."""

    def __init__(self, bundles):
        super().__init__()
        self.bundles, self.seen = bundles, None

    def progress(self, step, total, loss, lr):
        super().progress(step, total, loss, lr)
        if self.seen is None:
            b = self.bundles[0]
            self.seen = {"unet": _base_dtype(b.unet), "vae": next(b.vae.parameters()).dtype,
                         "te": _base_dtype(b.text_encoders[0]),
                         "lora": {p.dtype for m in [b.unet] + b.text_encoders for p in lora_lib.lora_parameters(m)}}


def _base_dtype(module):
    return next(p.dtype for n, p in module.named_parameters() if "lora_" not in n)


def _finite_image(pipe):
    image = pipe(TOKEN_PROMPT, num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    return image.shape == (1, 64, 64, 3) and bool(np.isfinite(image).all())


def _reload_and_generate(path, cfg, tmp_path):
    """The written file loads back, holds finite numbers, and the model it gives generates an image."""
    from dreambooth_ext.bridge import single_file_to_diffusers
    from dreambooth_ext.train.lora_export import apply_webui_lora, load_webui_lora

    state = load_file(str(path))
    assert state and all(torch.isfinite(v.float()).all() for v in state.values()), path
    if "Lora" in str(path):
        base = models.open_base(cfg.checkpoint, cfg.workspace_path(), cfg.family, progress=lambda _m: None)
        tes = base.text_encoders if cfg.text_encoder_mode == "lora" else []
        apply_webui_lora(base.unet, tes, load_webui_lora(str(path)), base.family)
        return _finite_image(models.make_pipeline(base))
    single_file_to_diffusers(path, tmp_path / "back", overwrite=True)
    return _finite_image(models.make_pipeline(models.load_bundle(tmp_path / "back")))


CASES = [
    ("sd1", "full", "frozen", {}),
    ("sd1", "full", "full", {"text_encoder_lr": 1e-4}),
    ("sd1", "lora", "lora", {"gradient_checkpointing": True}),
    # clip skip through a trained encoder's fp32 states into its bf16 final norm; the fused pass
    ("sd1", "lora", "lora", {"clip_skip": 2, "fused_backward_pass": True}),
    ("sd1", "lora", "frozen", {"cache_latents": False, "cache_text_embeddings": False}),
    ("sdxl", "lora", "frozen", {"gradient_checkpointing": True}),
]


@pytest.mark.parametrize("family,train_mode,te_mode,extra", CASES,
                         ids=[f"{f}-{m}-te_{t}" for f, m, t, _ in CASES])
def test_gpu_dtype_layout_trains_samples_and_saves(family, train_mode, te_mode, extra, tiny_checkpoints,
                                                   tmp_path, monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "bf16")
    bundles = capture_bundles(monkeypatch)
    cfg = small_config(tmp_path, tiny_checkpoints(family), train_mode=train_mode, text_encoder_mode=te_mode,
                       max_steps=2, sample_every=1, sample_steps=2, num_sample_images=1, use_ema=True, **extra)
    reporter = _DtypeWatch(bundles)
    result = train(cfg, reporter)

    assert result.status == "finished"
    assert reporter.seen["vae"] == BF16
    assert reporter.seen["unet"] == (FP32 if train_mode == "full" else BF16)
    assert reporter.seen["te"] == (FP32 if te_mode == "full" else BF16)
    assert reporter.seen["lora"] <= {FP32}  # adapters are fp32 master weights
    assert len(list((cfg.class_path(cfg.concepts[0])).glob("class_*.png"))) == 2
    assert len(result.samples) == 2  # step 1 and the final one
    assert all(np.isfinite(loss) for _, loss, _ in reporter.losses)
    assert result.outputs
    for path in result.outputs:
        assert _reload_and_generate(path, cfg, tmp_path)


def test_placement_keeps_trained_weights_fp32_and_frozen_ones_half(monkeypatch):
    cpu = torch.device("cpu")
    cfg = small_config_for_placement(train_mode="lora", text_encoder_mode="frozen")
    plain, _ = decide_placement(cfg, cpu)
    assert (plain.mode, plain.unet_dtype, plain.vae_dtype) == ("no", FP32, FP32)
    monkeypatch.setenv(EMULATE_ENV, "bf16")
    emulated, _ = decide_placement(cfg, cpu)
    assert (emulated.mode, emulated.unet_dtype, emulated.vae_dtype, emulated.text_encoder_dtype) == ("bf16", BF16, BF16, BF16)
    # cached latents and embeddings: the VAE and the frozen text encoder wait on the CPU while training
    assert emulated.where("train")["unet"] == cpu and emulated.vae_off_device_in_training
    assert emulated.text_encoders_off_device_in_training
    full, _ = decide_placement(small_config_for_placement(train_mode="full", text_encoder_mode="full"), cpu)
    assert (full.unet_dtype, full.text_encoder_dtype, full.vae_dtype) == (FP32, FP32, BF16)
    assert not full.text_encoders_off_device_in_training  # a trained encoder runs every step


def test_fp16_on_a_gpu_keeps_the_vae_fp32(monkeypatch):
    monkeypatch.setattr("dreambooth_ext.train.precision._native_bf16", lambda: False)
    placement, _ = decide_placement(small_config_for_placement(train_mode="lora", mixed_precision="auto"),
                                    torch.device("cuda"))
    assert placement.mode == "fp16"
    assert (placement.unet_dtype, placement.vae_dtype) == (torch.float16, FP32)  # SD VAEs overflow in fp16


def test_unknown_emulation_is_one_sentence(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "fp8")
    with pytest.raises(UserError, match=EMULATE_ENV):
        decide_placement(small_config_for_placement(), torch.device("cpu"))


def small_config_for_placement(**overrides):
    from dreambooth_ext.train.config import Concept, TrainConfig

    base = dict(checkpoint="x.safetensors", name="p", concepts=[Concept(instance_dir="d", instance_prompt="sks")])
    return TrainConfig(**{**base, **overrides})


def test_runs_with_other_precisions_follow_each_other_in_one_process(tiny_checkpoints, tmp_path, monkeypatch):
    """The WebUI trains many runs in one process; accelerate's per-process state must not pin the first precision."""
    ck = tiny_checkpoints("sd1")
    common = dict(train_mode="lora", max_steps=1, num_class_images=0, class_prompt="")
    assert train(small_config(tmp_path / "a", ck, mixed_precision="no", **common)).status == "finished"
    monkeypatch.setenv(EMULATE_ENV, "bf16")
    assert train(small_config(tmp_path / "b", ck, **common)).status == "finished"
    monkeypatch.delenv(EMULATE_ENV)
    assert train(small_config(tmp_path / "c", ck, mixed_precision="bf16", **common)).status == "finished"
