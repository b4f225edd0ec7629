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
    latents = LatentSource(bundle.vae, cfg, True)
    latents.precompute(instances.examples)
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
