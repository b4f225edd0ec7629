"""The written files carry the model spec, kohya's ss_* keys and the WebUI card's activation text."""

import json
import shutil

from safetensors import safe_open

from dreambooth_ext.train.run import train
from tests.trainer_helpers import DEMO, small_config


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _images(tmp_path):
    folder = tmp_path / "pose"
    folder.mkdir()
    for src in sorted(DEMO.glob("*.png"))[:2]:
        shutil.copy(src, folder / src.name)
        (folder / src.name).with_suffix(".txt").write_text("sks_pixarstyle, red hat")
    return folder


def test_lora_and_checkpoint_metadata_and_the_card(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), instance_dir=_images(tmp_path), train_mode="lora",
                       save_lora_merged=True, max_steps=2, num_class_images=0, clip_skip=2)
    cfg.concepts[0].caption_mode = "caption"
    cfg.concepts[0].instance_token = "sks_pixarstyle"
    lora_dir = cfg.lora_path()
    lora_dir.mkdir(parents=True)
    assert train(cfg).status == "finished"
    lora = _meta(lora_dir / "tiny_2.safetensors")
    assert lora["modelspec.sai_model_spec"] == "1.0.0"
    assert lora["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert lora["modelspec.resolution"] == "64x64" and lora["modelspec.trigger_phrase"] == "sks_pixarstyle"
    assert lora["modelspec.title"] and lora["modelspec.date"][:2] == "20"
    assert lora["ss_network_module"] == "networks.lora" and lora["ss_network_dim"] == "16"
    assert lora["ss_base_model_version"] == "sd_v1" and lora["ss_output_name"] == "tiny_2"
    assert json.loads(lora["ss_tag_frequency"]) == {"pose": {"sks_pixarstyle": 2, "red hat": 2}}
    assert lora["ss_resolution"] == "(64, 64)" and lora["ss_clip_skip"] == "2"
    assert "sks_pixarstyle" in lora["ss_training_comment"]
    assert json.loads(lora["ss_dataset_dirs"]) == {"pose": {"n_repeats": 1, "img_count": 2}}
    card = json.loads((lora_dir / "tiny_2.json").read_text())
    assert card["activation text"] == "sks_pixarstyle" and card["sd version"] == "SD1"
    ckpt = _meta(cfg.checkpoint_path() / "tiny_2.safetensors")
    assert ckpt["modelspec.architecture"] == "stable-diffusion-v1"
    assert ckpt["modelspec.trigger_phrase"] == "sks_pixarstyle" and ckpt["modelspec.encoder_layer"] == "2"


def test_a_users_card_is_never_replaced(tiny_checkpoints, tmp_path):
    cfg = small_config(tmp_path, tiny_checkpoints("sdxl"), train_mode="lora", max_steps=1, num_class_images=0,
                       class_prompt="")
    lora_dir = cfg.lora_path()
    lora_dir.mkdir(parents=True)
    (lora_dir / "tiny_1.json").write_text('{"activation text": "mine"}')
    assert train(cfg).status == "finished"
    assert json.loads((lora_dir / "tiny_1.json").read_text()) == {"activation text": "mine"}
    meta = _meta(lora_dir / "tiny_1.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.trigger_phrase"] == "sks_pixarstyle"  # found in the prompt: a rare word
