"""A pipeline loaded from a converted folder generates what the original modules generate,
and the converted weights equal what diffusers' own converters make of the same file."""

import numpy as np
import pytest
import torch

from dreambooth_ext.bridge import single_file_to_diffusers
from dreambooth_ext.tiny import build_models, single_file_from_models, tiny_family
from tests.helpers import load_any


def _pipeline_from_modules(fam, models, tmp_path):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from dreambooth_ext.tokenizer_files import write_tokenizer

    toks = []
    for i, te in enumerate(fam["text_encoders"]):
        d = write_tokenizer(tmp_path / f"tok{i}", pad_token=te["tokenizer_pad"])
        toks.append(CLIPTokenizer.from_pretrained(str(d if d else tmp_path / f"tok{i}")))
    sched_cls = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}[fam["scheduler"]["_class_name"]]
    scheduler = sched_cls.from_config({k: v for k, v in fam["scheduler"].items() if k != "_class_name"})
    if fam["family"] == "sdxl":
        return StableDiffusionXLPipeline(vae=models["vae"], text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
                                         tokenizer=toks[0], tokenizer_2=toks[1], unet=models["unet"], scheduler=scheduler)
    return StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=toks[0], unet=models["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a sks_pixarstyle character", num_inference_steps=3, height=128, width=128,
               generator=torch.Generator().manual_seed(7), output_type="np")
    return out.images[0]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_converted_folder_generates_the_same_image(family, tmp_path):
    from diffusers import DiffusionPipeline

    fam = tiny_family(family)
    models = build_models(fam, seed=3)
    reference = _generate(_pipeline_from_modules(fam, models, tmp_path))
    single = single_file_from_models(fam, models, tmp_path / "model.safetensors")
    single_file_to_diffusers(single, tmp_path / "converted")
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "converted"), local_files_only=True)
    image = _generate(pipe)
    assert np.abs(reference).mean() > 0.01  # not a blank image
    assert np.array_equal(reference, image)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_text_encoders_match_diffusers_converters(family, tiny_checkpoints, tmp_path):
    """An independent check of the text-encoder tables (incl. OpenCLIP's fused q/k/v split)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    src = tiny_checkpoints(family)
    state = load_any(src)
    folder = tmp_path / "d"
    single_file_to_diffusers(src, folder)
    fam = tiny_family(family)
    if family == "sd1":
        expected = [convert_ldm_clip_checkpoint(state)]
    elif family == "sd2":
        cfg = CLIPTextConfig(**fam["text_encoders"][0]["config"])
        expected = [convert_open_clip_checkpoint(CLIPTextModelWithProjection(cfg), state, prefix="cond_stage_model.model.")]
    else:
        cfg = CLIPTextConfig(**fam["text_encoders"][1]["config"])
        expected = [convert_ldm_clip_checkpoint(state, remove_prefix="conditioner.embedders.0.transformer."),
                    convert_open_clip_checkpoint(CLIPTextModelWithProjection(cfg), state, prefix="conditioner.embedders.1.model.")]
    for i, exp in enumerate(expected):
        ours = load_any(folder / ("text_encoder" if i == 0 else "text_encoder_2") / "model.safetensors")
        # diffusers keeps every OpenCLIP block it finds; SD2 uses one fewer (the penultimate output)
        last = fam["text_encoders"][-1]["config"]["num_hidden_layers"]
        exp = {k: v for k, v in exp.items() if not k.startswith(("cond_stage_model", "conditioner", "model."))
               and f"layers.{last}." not in k}
        assert set(ours) - {"text_model.embeddings.position_ids"} == set(exp) - {"text_model.embeddings.position_ids"}
        for k, v in ours.items():
            assert torch.equal(v, exp[k].to(v.dtype)), k
