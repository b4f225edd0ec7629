"""The per-step work: one UNet pass for the instance and class halves gives the two-pass loss and gradients."""

import pytest
import torch

from dreambooth_ext.train.batches import MicroBatch, PromptCache
from dreambooth_ext.train.dataset import LatentSource, build_examples
from dreambooth_ext.train.models import load_bundle, prepare_base
from tests.trainer_helpers import small_config


def _micro(tiny_checkpoints, tmp_path, family, **overrides):
    cfg = small_config(tmp_path, tiny_checkpoints(family), train_batch_size=2, num_class_images=0,
                       prior_loss_weight=0.7, **overrides)
    folder = prepare_base(cfg.checkpoint, cfg.workspace_path(), cfg.family)
    bundle = load_bundle(folder)
    # the class half uses the instance images under the class prompt: same shapes, other prompts and noise
    instances, _ = build_examples(cfg, lambda w: None)
    classes = type(instances)([type(e)(e.path, "a pixar-style character", e.size, e.bucket)
                               for e in instances.examples], 2, 99)
    latents = LatentSource(bundle.vae, cfg, True)  # encoded as the views are first asked for
    prompts = PromptCache(bundle, bundle.text_encoders, True)
    prompts.precompute([e.prompt for e in instances.examples + classes.examples])
    bundle.unet.requires_grad_(True)
    return MicroBatch(cfg, bundle, bundle.unet, latents, prompts, "cpu", torch.float32), instances, classes


def _loss_and_grads(micro, instances, classes, merge):
    micro.merge_halves = merge
    micro.unet.zero_grad(set_to_none=True)
    loss = micro.loss(instances, classes, 3, False)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in micro.unet.parameters()]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_one_pass_over_both_halves_is_the_two_pass_loss(tiny_checkpoints, tmp_path, family):
    micro, instances, classes = _micro(tiny_checkpoints, tmp_path, family, min_snr_gamma=5.0)
    merged, merged_grads = _loss_and_grads(micro, instances, classes, True)
    apart, apart_grads = _loss_and_grads(micro, instances, classes, False)
    assert torch.allclose(merged, apart, rtol=1e-5, atol=1e-7)
    for a, b in zip(merged_grads, apart_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    # and it is instance + weight * class: the class half alone moves the total by its weight
    instance_only, _ = _loss_and_grads(micro, instances, type(classes)([], 2, 0), True)
    assert not torch.allclose(instance_only, merged)


def _encodes(monkeypatch):
    calls = []
    real = LatentSource._encode

    def counting(self, batch):
        calls.append(batch.shape[0])
        return real(self, batch)

    monkeypatch.setattr(LatentSource, "_encode", counting)
    return calls


def test_latents_are_encoded_in_batches_once_and_reused_from_disk_by_the_next_run(tiny_checkpoints, tmp_path,
                                                                                 monkeypatch):
    from tests.recording import RecordingReporter
    from dreambooth_ext.train.run import train

    calls = _encodes(monkeypatch)
    monkeypatch.setattr(LatentSource, "batch_size", 4)  # as on a GPU
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), max_steps=3, train_batch_size=2, hflip=False,
                       num_class_images=0)
    first = train(cfg, RecordingReporter())
    assert sum(calls) == 6 and max(calls) > 1  # the six demo images, several per VAE call
    calls.clear()
    again = train(cfg, RecordingReporter())  # a finished run keeps no state: it trains again, from the cache
    assert calls == [] and again.status == first.status == "finished"


def test_a_changed_image_or_vae_misses_the_cache(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.dataset import View, build_examples
    from dreambooth_ext.train.latent_cache import DiskCache

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), num_class_images=0)
    bundle = load_bundle(prepare_base(cfg.checkpoint, cfg.workspace_path(), cfg.family))
    ex = build_examples(cfg, lambda w: None)[0].examples[0]
    cache = DiskCache(tmp_path / "c", bundle.vae, print)
    name = cache.name(ex, (0, 0), False)
    assert name != cache.name(ex, (0, 0), True) and name != cache.name(ex, (1, 0), False)
    for module, misses in ((bundle.vae.encoder, True), (bundle.vae.decoder, False)):  # the decoder does not encode
        weight = module.conv_in.weight
        kept = weight.detach().clone()
        with torch.no_grad():
            weight[0, 0, 0, 0] += 1
        assert (DiskCache(tmp_path / "c", bundle.vae, print).name(ex, (0, 0), False) != name) == misses
        with torch.no_grad():
            weight.copy_(kept)
    copy = tmp_path / "copy.png"
    copy.write_bytes(ex.path.read_bytes() + b"\0")
    assert cache.name(type(ex)(copy, ex.prompt, ex.size, ex.bucket), (0, 0), False) != name


def test_a_short_run_encodes_only_the_class_images_it_shows(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.dataset import ExampleSet, build_examples
    from dreambooth_ext.train.latent_cache import used_views

    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), num_class_images=0, hflip=True)
    instances = build_examples(cfg, lambda w: None)[0]
    many = ExampleSet(instances.examples * 5, 1, 3)
    views = used_views(many, 4, cfg)
    assert len(views) == 4
    assert len(used_views(many, 10_000, cfg)) == 2 * len(many)  # a long run: every image, both flips


def test_a_second_run_name_on_the_same_checkpoint_does_not_convert_it_again(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext import bridge

    ck = tiny_checkpoints("sd1")
    one = small_config(tmp_path, ck, name="one", num_class_images=0)
    two = small_config(tmp_path, ck, name="two", num_class_images=0)
    first = prepare_base(one.checkpoint, one.workspace_path(), "auto")
    converted = []
    real = bridge.single_file_to_diffusers
    monkeypatch.setattr(bridge, "single_file_to_diffusers", lambda *a, **k: converted.append(a) or real(*a, **k))
    said = []
    second = prepare_base(two.checkpoint, two.workspace_path(), "auto", progress=said.append)
    assert converted == [] and any("made for one" in s for s in said)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (second / weights).read_bytes() == (first / weights).read_bytes()
    import shutil

    changed = shutil.copy(ck, tmp_path / "changed.safetensors")
    shutil.copy(ck.with_suffix(".yaml"), tmp_path / "changed.yaml")
    other = small_config(tmp_path, changed, name="three", num_class_images=0)
    prepare_base(other.checkpoint, other.workspace_path(), "auto")  # another file: its own conversion
    assert len(converted) == 1
