"""A run reads long captions and clip skip as set: the UNet is trained against that conditioning."""

import shutil

import pytest
import torch

import dreambooth_ext.train.batches as batches
from dreambooth_ext.train.long_prompts import prompt_chunks
from dreambooth_ext.train.run import train
from tests.trainer_helpers import DEMO, capture_bundles, small_config

LONG = " ".join(["red"] * 75 + ["blue"] * 40)


def _long_captions(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, src in enumerate(sorted(DEMO.glob("*.png"))[:2]):
        shutil.copy(src, folder / src.name)
        (folder / src.name).with_suffix(".txt").write_text(LONG if i == 0 else "short caption")
    return folder


def _record(monkeypatch):
    seen = []
    real_half = batches.MicroBatch._half

    def half(self, *a, **k):  # each side's conditioning, as the UNet gets it
        out = real_half(self, *a, **k)
        seen.append(out.cond.detach())
        return out

    monkeypatch.setattr(batches.MicroBatch, "_half", half)
    return seen, capture_bundles(monkeypatch)


@pytest.mark.parametrize("family,emulate", [("sd1", ""), ("sdxl", ""), ("sd1", "bf16")])
def test_long_captions_train_sample_and_make_class_images(family, emulate, tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.train.placement import EMULATE_ENV

    if emulate:  # the GPU's layout: half-precision text encoder, fp32 adapters, autocast
        monkeypatch.setenv(EMULATE_ENV, emulate)
    seen, _ = _record(monkeypatch)
    cfg = small_config(tmp_path, tiny_checkpoints(family), instance_dir=_long_captions(tmp_path), max_steps=1,
                       train_batch_size=2, max_prompt_tokens=150, sample_every=1, num_sample_images=1,
                       sample_steps=1, sample_prompts=[LONG], class_prompt=LONG, num_class_images=1,
                       train_mode="lora")
    cfg.concepts[0].caption_mode = "caption"
    result = train(cfg)
    assert result.status == "finished" and len(result.samples) == 2
    assert seen[0].shape[:2] == (2, 154)  # the short caption is padded with an empty chunk
    assert seen[1].shape[1] == 154  # the class prompt is long too


def test_clip_skip_2_trains_against_the_penultimate_layer(tiny_checkpoints, tmp_path, monkeypatch):
    seen, bundles = _record(monkeypatch)
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=1, clip_skip=2, num_class_images=0,
                       class_prompt="", train_mode="lora")
    assert train(cfg).status == "finished"
    te, tok = bundles[0].text_encoders[0], bundles[0].tokenizers[0]
    ids = torch.tensor(prompt_chunks(tok, cfg.concepts[0].instance_prompt, 1))
    with torch.no_grad():
        wanted = te.text_model.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        last = te(ids)[0]
    assert torch.allclose(seen[0][0], wanted[0], atol=1e-6)
    assert not torch.allclose(seen[0][0], last[0], atol=1e-3)
