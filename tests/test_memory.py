"""The memory estimator: its shape (monotonic, LoRA below full, checkpointing lower) and its calibration."""

import dataclasses

import pytest
import torch

from dreambooth_ext.train.memory import (GB, PARAMETERS, MemorySettings, activation_bytes, estimate_memory,
                                         expected_error, form_memory_note, parameter_counts)


def _gb(**overrides) -> float:
    return estimate_memory(MemorySettings(**overrides)).total_gb


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("train_mode", ["full", "lora"])
def test_estimate_grows_with_resolution_and_batch(family, train_mode):
    sizes = [_gb(family=family, train_mode=train_mode, resolution=r) for r in (256, 512, 768, 1024)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    batches = [_gb(family=family, train_mode=train_mode, batch_size=b, sampling=False) for b in (1, 2, 4)]
    assert batches[0] < batches[1] < batches[2]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_lora_needs_less_than_full_and_checkpointing_lowers_it(family):
    for gc in (False, True):
        assert _gb(family=family, train_mode="lora", gradient_checkpointing=gc) < _gb(
            family=family, train_mode="full", gradient_checkpointing=gc)
    for mode in ("full", "lora"):
        assert _gb(family=family, train_mode=mode, gradient_checkpointing=True, sampling=False) < _gb(
            family=family, train_mode=mode, gradient_checkpointing=False, sampling=False)
    assert _gb(family=family, train_mode="full", optimizer="adamw8bit") < _gb(family=family, train_mode="full")


def test_parts_follow_the_settings():
    full = estimate_memory(MemorySettings(family="sd1", train_mode="full", optimizer="adamw"))
    n = PARAMETERS["sd1"]["unet"]
    assert full.parts["gradients"] == 4 * n and full.parts["optimizer"] == 8 * n  # fp32 grads, two fp32 Adam states
    lora = estimate_memory(MemorySettings(family="sd1", train_mode="lora", lora_rank=16))
    assert lora.parts["gradients"] == 4 * 16 * PARAMETERS["sd1"]["attention"]
    uncached = estimate_memory(MemorySettings(family="sd1", cache_latents=False, cache_text_embeddings=False))
    assert uncached.parts["weights"] > lora.parts["weights"]  # the VAE and the text encoder stay on the GPU
    fp32 = estimate_memory(MemorySettings(family="sd1", mixed_precision="no"))
    assert fp32.parts["activations"] == 2 * lora.parts["activations"]
    fused = estimate_memory(MemorySettings(family="sd1", train_mode="full", optimizer="adamw", fused_backward=True))
    assert fused.parts["gradients"] == 0 and fused.total_gb == pytest.approx(full.total_gb - 4 * n / GB)


def test_a_trained_text_encoders_activations_are_counted_and_measured_within_the_error():
    """A small CLIP encoder with LoRA adapters, two 77-token prompts, bf16 autocast: measured by torch's memory
    profiler against the estimate, whose constants come from SD1's and SDXL's real encoders
    (./run.sh bench memory_calibrate --text-encoders)."""
    import transformers

    from dreambooth_ext.train.memory import TE_ACTIVATION_BYTES, text_encoder_activation_bytes
    from dreambooth_ext.train.memory_calibration import measure_text_encoder_activation_bytes

    config = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=77)
    measured = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
        measured[checkpointed] = measure_text_encoder_activation_bytes([te], 2, checkpointed=checkpointed)
    for checkpointed in (False, True):
        estimated = text_encoder_activation_bytes([config], 2, checkpointed=checkpointed, half=True)
        assert abs(measured[checkpointed] - estimated) <= expected_error(checkpointed) * estimated, checkpointed
    assert measured[True] < measured[False] / 3  # checkpointing keeps a fraction

    def est(**kw):
        return estimate_memory(MemorySettings(family="sdxl", train_mode="lora", **kw)).parts["activations"]

    frozen, lora, lora_gc = est(), est(text_encoder_mode="lora"), est(text_encoder_mode="lora", gradient_checkpointing=True)
    assert lora - frozen == pytest.approx(TE_ACTIVATION_BYTES * 77 * 2 * (12 * 768 + 32 * 1280))  # SDXL's two encoders
    assert 0 < lora_gc - est(gradient_checkpointing=True) < (lora - frozen) / 10


def test_half_copies_of_trained_weights_count_until_checkpointing_releases_them():
    from dreambooth_ext.train.memory import WEIGHT_COPY_BYTES

    def est(**kw):
        return estimate_memory(MemorySettings(family="sdxl", train_mode="full", optimizer="adafactor",
                                              mixed_precision="bf16", sampling=True, **kw))

    n = PARAMETERS["sdxl"]
    plain, te_full, checkpointed = est(), est(text_encoder_mode="full"), est(gradient_checkpointing=True)
    # the text encoders' copies too: 1.5 GiB for SDXL's two
    te_acts = est(text_encoder_mode="lora").parts["activations"] - plain.parts["activations"]
    assert te_full.parts["activations"] - plain.parts["activations"] == pytest.approx(
        WEIGHT_COPY_BYTES * n["text_encoders"] + te_acts)
    # a sample's denoising loop keeps the UNet's copies cached; checkpointing's hooks drop them
    assert plain.sampling_peak - checkpointed.sampling_peak == WEIGHT_COPY_BYTES * n["unet"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_parameter_table_matches_the_family_configs(family):
    counted = parameter_counts(family, "attention", 1)
    table = PARAMETERS[family]
    assert (counted["unet"], counted["vae"], counted["text_encoders"]) == (table["unet"], table["vae"], table["text_encoders"])
    assert (counted["unet_lora"], counted["te_lora"]) == (table["attention"], table["te_lora"])
    assert (counted["adafactor_unet"], counted["adafactor_text_encoders"]) == (
        table["adafactor_unet"], table["adafactor_text_encoders"])


def test_adafactor_state_count_is_what_the_optimizer_keeps_and_the_estimate_uses_it():
    """Counted on a tiny UNet stepped by the trainer's own Adafactor: convolutions keep most of their size."""
    from diffusers import UNet2DConditionModel

    from dreambooth_ext.tiny import tiny_family
    from dreambooth_ext.train.memory import adafactor_state_count
    from dreambooth_ext.train.optim import make_optimizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_family("sd1")["unet"])
    opt = make_optimizer("adafactor", [{"params": list(unet.parameters()), "lr": 1e-4}], betas=(0.9, 0.999),
                         eps=1e-8, weight_decay=0.0, device="cpu")
    for p in unet.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    kept = sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    assert kept == adafactor_state_count(unet)
    convs = sum(p.numel() for p in unet.parameters() if p.dim() == 4)
    assert kept > 0.5 * convs  # not the ~0 it is known for on transformers' linear layers
    full = estimate_memory(MemorySettings(family="sd1", train_mode="full", optimizer="adafactor"))
    assert full.parts["optimizer"] == 4 * PARAMETERS["sd1"]["adafactor_unet"]
    assert full.parts["optimizer"] > 0.5 * 4 * PARAMETERS["sd1"]["unet"]  # SD1.5's UNet: 1.7 GiB, not 0.1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_measured_activations_of_a_tiny_unet_are_within_the_stated_error(family, checkpointed):
    """The calibration measurement (torch's memory profiler over a real LoRA step) on a tiny UNet of the family."""
    from diffusers import UNet2DConditionModel

    from dreambooth_ext.tiny import tiny_family
    from dreambooth_ext.train.memory_calibration import measure_activation_bytes

    torch.manual_seed(0)
    config = tiny_family(family)["unet"]
    unet = UNet2DConditionModel.from_config(config)
    measured = measure_activation_bytes(unet, latent_side=32, batch=2, checkpointed=checkpointed)
    estimated = activation_bytes(config, 32 * 32, 2, checkpointed=checkpointed, half=True)
    assert abs(measured - estimated) <= expected_error(checkpointed) * measured, (measured, estimated)


def test_tab_note_warns_when_the_gpu_is_too_small():
    form = {"train_mode": "full", "optimizer": "adamw", "resolution": 512, "prior_loss_weight": 1.0,
            "concept1.class_prompt": "a dog", "sample_every": 100}
    roomy = form_memory_note(form, "", 80)
    assert roomy.startswith("sd1: estimated ~") and "Warning" not in roomy
    tight = form_memory_note(form, "", 6)
    assert tight.startswith("Warning:") and "6 GB" in tight
    assert "unavailable" in form_memory_note({**form, "resolution": "x"}, "", 6)


def test_goals_as_estimated():
    """The issue's goals, as the estimator sees them (the GPU check measures them on a GPU)."""
    lora15 = MemorySettings(family="sd1", train_mode="lora", resolution=512)
    assert _gb(**dataclasses.asdict(lora15)) <= 4
    sdxl = MemorySettings(family="sdxl", train_mode="lora", resolution=1024, gradient_checkpointing=True)
    assert _gb(**dataclasses.asdict(sdxl)) <= 10
    assert estimate_memory(sdxl).total < 10 * GB


def test_the_tab_refreshes_on_every_setting_the_estimate_reads():
    """MEMORY_SETTINGS (and each concept's MEMORY_CONCEPT_SETTINGS) name all that settings_from_config reads."""
    from dreambooth_ext.train.config import Concept, TrainConfig
    from dreambooth_ext.train.memory import MEMORY_CONCEPT_SETTINGS, MEMORY_SETTINGS, settings_from_config

    class Reading:
        def __init__(self, obj, seen):
            self._obj, self._seen = obj, seen

        def __getattr__(self, name):
            self._seen.add(name)
            value = getattr(self._obj, name)
            return [Reading(c, concept_seen) for c in value] if name == "concepts" else value

    seen, concept_seen = set(), set()
    cfg = TrainConfig(prior_loss_weight=1.0, concepts=[Concept(class_prompt="a dog")])
    settings_from_config(Reading(cfg, seen))
    assert seen - {"concepts"} <= set(MEMORY_SETTINGS)
    assert concept_seen <= set(MEMORY_CONCEPT_SETTINGS) and concept_seen


def test_the_tabs_estimate_counts_prior_preservation_as_the_configs_does():
    from dreambooth_ext.train.config import Concept, TrainConfig
    from dreambooth_ext.train.memory import estimate_for_config

    form = {"train_mode": "lora", "resolution": 512, "prior_loss_weight": 1.0, "concept1.class_prompt": "a dog"}
    for count in (0, 20):
        cfg = TrainConfig(train_mode="lora", concepts=[Concept(class_prompt="a dog", num_class_images=count)])
        note = form_memory_note({**form, "concept1.num_class_images": count}, "", None)
        assert f"~{estimate_for_config(cfg).total_gb:.1f} GB" in note, (count, note)


def test_the_vae_sees_one_picture_per_call_in_a_whole_run(tiny_checkpoints, tmp_path, monkeypatch):
    """Latent caching, the monitor, class images and samples all go through the VAE one picture at a
    time: its full-resolution activations grow with the call, and the estimate allows for one picture
    (on a GPU, a monitor that encoded 6 pictures at 1024 px at once more than doubled an SDXL LoRA run's peak)."""
    from diffusers import AutoencoderKL

    from dreambooth_ext.train.run import train
    from tests.recording import RecordingReporter
    from tests.trainer_helpers import small_config

    checkpoint = tiny_checkpoints("sd1")  # built before the watch: making it encodes a batch
    calls = []
    for name in ("encode", "decode"):
        real = getattr(AutoencoderKL, name)

        def watched(self, x, *args, real=real, name=name, **kwargs):
            calls.append((name, x.shape[0]))
            return real(self, x, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, name, watched)
    cfg = small_config(tmp_path, checkpoint, num_class_images=3, class_image_batch_size=3,
                       max_steps=2, sample_every=2, sample_steps=2, num_sample_images=2)
    assert train(cfg, RecordingReporter()).status == "finished"
    assert {n for n, _ in calls} == {"encode", "decode"}
    assert all(batch == 1 for _, batch in calls), sorted(set(calls))
