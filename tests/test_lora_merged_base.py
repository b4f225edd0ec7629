"""A merged LoRA checkpoint starts from the base's stored full-precision weights, not the half ones in memory."""

import torch
from safetensors.torch import load_file

from dreambooth_ext.train.placement import EMULATE_ENV
from dreambooth_ext.train.run import train
from tests.trainer_helpers import small_config


def test_merged_checkpoint_keeps_untouched_weights_bit_for_bit(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "bf16")  # frozen UNet weights sit in memory as bf16, as on a GPU
    base_file = tiny_checkpoints("sd1")
    cfg = small_config(tmp_path, base_file, train_mode="lora", save_lora_merged=True, max_steps=2,
                       num_class_images=0, class_prompt="", save_dtype="fp32")
    result = train(cfg)
    merged = [p for p in result.outputs if "Stable-diffusion" in p and p.endswith(".safetensors")]
    assert len(merged) == 1
    written, base = load_file(merged[0]), load_file(str(base_file))
    unet_keys = [k for k in base if k.startswith("model.diffusion_model.")]
    attention = [k for k in unet_keys if ".attn" in k and k.endswith(("to_q.weight", "to_k.weight", "to_v.weight",
                                                                      "to_out.0.weight"))]
    untouched = [k for k in unet_keys if k not in attention and base[k].dtype == torch.float32]
    assert untouched and all(torch.equal(written[k], base[k]) for k in untouched)
    assert all(not torch.equal(written[k], base[k]) for k in attention)  # the adapters are merged in
    # the bf16 copy in memory differs from the base: the test would catch a merge made onto it
    assert any(not torch.equal(base[k].bfloat16().float(), base[k]) for k in untouched)
