"""Per-concept sample prompts and class-image settings, falling back to the run's own."""

import dreambooth_ext.train.class_images as class_images
from dreambooth_ext.train.config import Concept
from dreambooth_ext.train.run import train
from dreambooth_ext.train.samples import sample_prompts
from tests.trainer_helpers import DEMO, small_config


def test_each_concept_samples_its_own_prompts_after_its_instance_prompt(tmp_path):
    cfg = small_config(tmp_path, "x.safetensors", sample_prompts=["a shared prompt"])
    cfg.concepts[0].concept_sample_prompts = ["a sks_pixarstyle character skiing"]
    cfg.concepts.append(Concept(instance_dir=str(DEMO), instance_prompt="a zwx toy",
                                concept_sample_prompts=["a zwx toy on a shelf"]))
    assert sample_prompts(cfg) == ["a sks_pixarstyle character", "a sks_pixarstyle character skiing",
                                   "a zwx toy", "a zwx toy on a shelf", "a shared prompt"]


def test_class_images_use_the_concepts_settings_or_the_runs(tiny_checkpoints, tmp_path, monkeypatch):
    calls = []
    real = class_images.generate_images
    monkeypatch.setattr(class_images, "generate_images", lambda pipe, autocast, text, **call: calls.append(
        (call["prompt"][0], call["num_inference_steps"], call["guidance_scale"], call["negative_prompt"][0]))
        or real(pipe, autocast, text, **call))
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=1, train_mode="lora", num_class_images=1,
                       class_image_steps=2, class_image_guidance=7.0, class_image_negative_prompt="ugly")
    cfg.concepts[0].class_steps, cfg.concepts[0].class_guidance = 3, 4.5
    cfg.concepts[0].class_negative_prompt = "blurry"
    cfg.concepts.append(Concept(instance_dir=str(DEMO), instance_prompt="a zwx toy", class_prompt="a toy",
                                num_class_images=1))
    assert train(cfg).status == "finished"
    assert sorted(calls) == [("a pixar-style character", 3, 4.5, "blurry"), ("a toy", 2, 7.0, "ugly")]
