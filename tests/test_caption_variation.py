"""Tag shuffling with kept leading tags and caption dropout: what the UNet is trained with, and exact resumes."""

import random
import shutil

import torch
from safetensors.torch import load_file

import dreambooth_ext.train.batches as batches
from dreambooth_ext.train.caption_variation import shuffle_tags
from tests.recording import RecordingReporter
from dreambooth_ext.train.run import train
from tests.trainer_helpers import DEMO, small_config

CAPTION = "sks_pixarstyle, red hat, blue coat, green boots, yellow scarf, smiling"


def test_shuffle_keeps_the_leading_tags():
    orders = {shuffle_tags(CAPTION, 2, random.Random(i)) for i in range(30)}
    assert len(orders) > 5
    for o in orders:
        tags = o.split(", ")
        assert tags[:2] == ["sks_pixarstyle", "red hat"] and sorted(tags) == sorted(CAPTION.split(", "))


def _images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir(parents=True)
    for src in sorted(DEMO.glob("*.png"))[:2]:
        shutil.copy(src, folder / src.name)
        (folder / src.name).with_suffix(".txt").write_text(CAPTION)
    return folder


def _config(tmp_path, ck, images, **kw):
    cfg = small_config(tmp_path, ck, instance_dir=images, max_steps=12, shuffle_tags=True, keep_tokens=1,
                       caption_dropout=0.25, num_class_images=0, class_prompt="", train_mode="lora", **kw)
    cfg.concepts[0].caption_mode = "caption"
    return cfg


def _record_prompts(monkeypatch):
    seen = []
    real = batches.PromptCache.get
    monkeypatch.setattr(batches.PromptCache, "get", lambda self, prompts, *a: seen.append(list(prompts)) or
                        real(self, prompts, *a))
    return seen


def test_captions_vary_per_step_and_resume_exactly(tiny_checkpoints, tmp_path, monkeypatch):
    ck = tiny_checkpoints("sd1")
    images = _images(tmp_path)
    seen = _record_prompts(monkeypatch)
    straight = _config(tmp_path / "a", ck, images)
    train(straight, RecordingReporter())
    prompts = [p for batch in seen for p in batch]
    assert len(prompts) == 12
    assert "" in prompts  # dropped captions
    kept = [p for p in prompts if p]
    assert len(set(kept)) > 3 and all(p.startswith("sks_pixarstyle, ") for p in kept)
    seen.clear()
    split = _config(tmp_path / "b", ck, images)
    train(split, RecordingReporter(stop_at_step=5))
    train(split, RecordingReporter())
    assert [p for batch in seen for p in batch] == prompts
    a = load_file(str(tmp_path / "a" / "models" / "Lora" / "tiny_12.safetensors"))
    b = load_file(str(tmp_path / "b" / "models" / "Lora" / "tiny_12.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
