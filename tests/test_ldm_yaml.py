"""WebUI/LDM yaml <-> family dict: round trips, a local CLIP folder, Stability's own layout, errors."""

import os

# Set before transformers is imported: a local folder must never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import copy
import json
from pathlib import Path

import pytest
import yaml

from dreambooth_ext.bridge.ldm_yaml import parse_yaml
from dreambooth_ext.bridge.ldm_yaml_write import generate_yaml
from dreambooth_ext.errors import UserError

FAMILIES = Path(__file__).resolve().parent.parent / "dreambooth_ext" / "data" / "families"
NAMES = ("sd1", "sd2", "sd2-v", "sdxl")


def family(name: str) -> dict:
    with open(FAMILIES / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def write(tmp_path: Path, text: str, name: str = "model.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_reproduces_the_family(tmp_path, name):
    fam = family(name)
    text = generate_yaml(fam)
    parsed = parse_yaml(write(tmp_path, text), base=copy.deepcopy(fam))
    assert parsed["family"] == name
    assert parsed["unet"] == fam["unet"]
    assert parsed["vae"] == fam["vae"]
    assert parsed["scheduler"]["prediction_type"] == fam["scheduler"]["prediction_type"]
    assert parsed["text_encoders"] == fam["text_encoders"]


@pytest.mark.parametrize("name", NAMES)
def test_generated_yaml_has_the_webui_layout(name):
    fam = family(name)
    model = yaml.safe_load(generate_yaml(fam, clip_version="openai/clip-vit-large-patch14"))["model"]
    p = model["params"]
    if name == "sdxl":
        assert model["target"] == "sgm.models.diffusion.DiffusionEngine"
        net = p["network_config"]["params"]
        assert net["adm_in_channels"] == 2816 and net["num_classes"] == "sequential"
        assert net["transformer_depth"] == [1, 2, 10] and net["attention_resolutions"] == [2, 4]
        assert net["num_head_channels"] == 64 and net["context_dim"] == 2048
        assert p["denoiser_config"]["params"]["scaling_config"]["target"].endswith(".EpsScaling")
        assert p["denoiser_config"]["params"]["discretization_config"]["target"].endswith(".LegacyDDPMDiscretization")
        embs = p["conditioner_config"]["params"]["emb_models"]
        assert [e["target"].rsplit(".", 1)[1] for e in embs] == [
            "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"] + ["ConcatTimestepEmbedderND"] * 3
        assert [e["input_key"] for e in embs[2:]] == ["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]
        assert all(e["params"]["outdim"] == 256 for e in embs[2:])
        assert embs[0]["params"]["version"] == "openai/clip-vit-large-patch14"
        assert embs[1]["params"]["arch"] == "ViT-bigG-14"
        assert p["first_stage_config"]["target"] == "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"
        assert p["scale_factor"] == 0.13025
        return
    assert model["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert p["parameterization"] == "v" if name == "sd2-v" else "parameterization" not in p
    assert (p["linear_start"], p["linear_end"], p["timesteps"]) == (0.00085, 0.012, 1000)
    assert p["conditioning_key"] == "crossattn" and p["cond_stage_trainable"] is False
    u = p["unet_config"]
    assert u["target"] == "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    assert u["params"]["attention_resolutions"] == [1, 2, 4] and u["params"]["channel_mult"] == [1, 2, 4, 4]
    assert u["params"]["use_checkpoint"] is True and u["params"]["legacy"] is False
    assert p["first_stage_config"]["target"] == "ldm.models.autoencoder.AutoencoderKL"
    assert p["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2, 4, 4]
    cond = p["cond_stage_config"]
    if name == "sd1":
        assert u["params"]["num_heads"] == 8 and u["params"]["use_linear_in_transformer"] is False
        assert cond["target"] == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
        assert cond["params"]["version"] == "openai/clip-vit-large-patch14"
    else:
        assert u["params"]["num_head_channels"] == 64 and u["params"]["use_linear_in_transformer"] is True
        assert cond["target"] == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
        assert cond["params"] == {"freeze": True, "layer": "penultimate"}


def test_inpainting_unet_gets_the_hybrid_config():
    fam = family("sd1")
    fam["unet"]["in_channels"] = 9
    model = yaml.safe_load(generate_yaml(fam))["model"]
    assert model["target"] == "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    assert model["params"]["conditioning_key"] == "hybrid"
    assert model["params"]["unet_config"]["params"]["in_channels"] == 9


def test_architectures_the_ldm_unet_cannot_express_are_refused():
    fam = family("sd1")
    fam["unet"]["up_block_types"] = ["CrossAttnUpBlock2D"] * 4
    with pytest.raises(ValueError, match="mirror"):
        generate_yaml(fam)
    fam = family("sd2")
    fam["unet"]["transformer_layers_per_block"] = [1, 2, 3, 4]
    with pytest.raises(ValueError, match="vary by level"):
        generate_yaml(fam)
    fam = family("sd2")
    fam["unet"]["attention_head_dim"] = [5, 8, 20, 20]
    with pytest.raises(ValueError, match="heads"):
        generate_yaml(fam)
    fam = family("sd1")
    fam["unet"]["resnet_time_scale_shift"] = "scale_shift"
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        generate_yaml(fam)


TINY_SD1 = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 8
    channels: 4
    conditioning_key: crossattn
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 2 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2 ]
        num_heads: 2
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: tiny_clip
"""


def test_shrunken_sd1_yaml_with_a_local_clip_folder(tmp_path):
    from transformers import CLIPTextConfig

    folder = tmp_path / "tiny_clip"
    CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                   max_position_embeddings=77, vocab_size=1000, projection_dim=32).save_pretrained(str(folder))
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    fam = parse_yaml(write(tmp_path, TINY_SD1), base=family("sd1"))

    cfg = fam["text_encoders"][0]["config"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]) == (32, 37, 4, 2)
    assert (cfg["vocab_size"], cfg["projection_dim"], cfg["max_position_embeddings"]) == (1000, 32, 77)
    assert cfg["hidden_act"] == "quick_gelu"  # a CLIPTextConfig default save_pretrained leaves out
    assert fam["text_encoders"][0]["tokenizer_dir"] == str(folder.resolve())

    u = fam["unet"]
    assert u["block_out_channels"] == [32, 64] and u["layers_per_block"] == 1
    assert u["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert u["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    assert u["attention_head_dim"] == 2 and u["cross_attention_dim"] == 32 and u["sample_size"] == 8
    assert u["transformer_layers_per_block"] == 1 and u["use_linear_projection"] is False
    v = fam["vae"]
    assert v["block_out_channels"] == [32, 64] and v["layers_per_block"] == 1 and v["sample_size"] == 64
    assert v["down_block_types"] == ["DownEncoderBlock2D"] * 2 and v["norm_num_groups"] == 32
    assert fam["scheduler"]["prediction_type"] == "epsilon" and fam["family"] == "sd1"


def test_full_clip_config_and_hub_names(tmp_path):
    from transformers import CLIPConfig

    folder = tmp_path / "models" / "clip"
    CLIPConfig(text_config={"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 3,
                            "num_hidden_layers": 3, "hidden_act": "gelu"},
               projection_dim=48).save_pretrained(str(folder))
    text = TINY_SD1.replace("version: tiny_clip", f"version: {folder}")
    fam = parse_yaml(write(tmp_path, text), base=family("sd1"))
    cfg = fam["text_encoders"][0]["config"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["hidden_act"]) == (48, 3, "gelu")
    assert "tokenizer_dir" not in fam["text_encoders"][0]  # no vocab.json/merges.txt there

    text = TINY_SD1.replace("version: tiny_clip", "version: openai/clip-vit-large-patch14")
    fam = parse_yaml(write(tmp_path, text), base=family("sd1"))
    assert fam["text_encoders"] == family("sd1")["text_encoders"]


# Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml, key for key
V2_INFERENCE_V = """\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # inference only

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def test_stability_v2_inference_v_yaml(tmp_path):
    path = write(tmp_path, V2_INFERENCE_V)
    fam = parse_yaml(path, base=family("sd2"))  # what detection from the weights gives
    assert fam["family"] == "sd2-v"
    assert fam["scheduler"]["prediction_type"] == "v_prediction"
    assert fam["unet"] == family("sd2-v")["unet"]  # stock image_size 64 does not shrink the 768 model
    assert fam["vae"] == family("sd2-v")["vae"]
    assert fam["text_encoders"] == family("sd2")["text_encoders"]
    # the same file without parameterization is the 512 epsilon model
    eps = write(tmp_path, V2_INFERENCE_V.replace('    parameterization: "v"\n', ""), "eps.yaml")
    fam = parse_yaml(eps, base=family("sd2-v"))
    assert fam["family"] == "sd2" and fam["scheduler"]["prediction_type"] == "epsilon"
    assert fam["unet"] == family("sd2")["unet"]


def test_sdxl_v_denoiser_and_stock_sgm_layout(tmp_path):
    fam = family("sdxl")
    fam["scheduler"]["prediction_type"] = "v_prediction"
    text = generate_yaml(fam)
    assert "VScaling" in text and "VWeighting" in text
    parsed = parse_yaml(write(tmp_path, text), base=family("sdxl"))
    assert parsed["scheduler"]["prediction_type"] == "v_prediction" and parsed["family"] == "sdxl"
    assert parsed["unet"] == family("sdxl")["unet"]


@pytest.mark.parametrize("text, why", [
    ("model:\n  params: [unclosed\n", "not valid YAML"),
    ("model:\n  target: x\n", "no model.params"),
    ("- just\n- a list\n", "no model.params"),
    (TINY_SD1.replace("channel_mult: [ 1, 2 ]", "channel_mult: lots"), "its unet_config is wrong"),
])
def test_broken_yaml_names_the_file(tmp_path, text, why):
    path = write(tmp_path, text, "broken-model.yaml")
    with pytest.raises(UserError) as err:
        parse_yaml(path, base=family("sd1"))
    assert "broken-model.yaml" in str(err.value) and why in str(err.value)
