"""The typed training config: one declaration per setting, exact JSON round trip, one-sentence errors."""

import argparse
import dataclasses
import json

import pytest

from dreambooth_ext.errors import UserError
from dreambooth_ext.train.config import GROUPS, Concept, TrainConfig, describe
from dreambooth_ext.train.config_io import load_config, save_config, to_dict
from dreambooth_ext.train.config_checks import validate
from dreambooth_ext.train.config_cli import add_arguments, config_from_args
from dreambooth_ext.train.recommend import recommended


def good_config(**overrides) -> TrainConfig:
    concept = Concept(instance_dir="data/pixar", instance_prompt="a sks_pixarstyle character",
                      class_prompt="a pixar-style character", num_class_images=20)
    return dataclasses.replace(TrainConfig(checkpoint="base.safetensors", name="pixar", concepts=[concept]),
                               **overrides)


def one_sentence(message: str) -> bool:
    body = message.replace("e.g. ", "").rstrip(".?")
    return message[-1] in ".?" and ". " not in body and "\n" not in message


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


# --- round trip and coercion -----------------------------------------------------------------

def test_json_round_trip_is_exact(tmp_path):
    cfg = good_config(learning_rate=3.3e-6, lora_alpha=8.5, sample_prompts=["a sks_pixarstyle dog", "ünïcode"],
                      sample_seeds=[1, 2**31], hflip=True, seed=2**32 - 1, adam_epsilon=1e-10)
    cfg.concepts.append(Concept(instance_dir="d2", instance_prompt="[filewords] ohwx", caption_mode="filewords"))
    path = save_config(cfg, tmp_path / "sub" / "cfg.json")
    back = load_config(path)
    assert back == cfg
    assert isinstance(back.concepts[1], Concept)
    assert path.read_text(encoding="utf-8") == save_config(back, tmp_path / "again.json").read_text(encoding="utf-8")
    assert isinstance(json.loads(path.read_text())["concepts"], list)
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]


def test_json_values_are_coerced_sensibly():
    cfg = load_config({"max_steps": 800.0, "learning_rate": 1, "hflip": "yes", "center_crop": 0,
                       "sample_prompts": "one prompt", "sample_seeds": ["7", 8], "resolution": "768",
                       "concepts": {"instance_dir": "x", "instance_prompt": "sks dog", "class_dir": None}})
    assert cfg.max_steps == 800 and type(cfg.max_steps) is int
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.hflip is True and cfg.center_crop is False
    assert cfg.sample_prompts == ["one prompt"] and cfg.sample_seeds == [7, 8] and cfg.resolution == 768
    assert cfg.concepts == [Concept(instance_dir="x", instance_prompt="sks dog")]


@pytest.mark.parametrize("key, value, words", [
    ("max_steps", "many", "whole number"), ("max_steps", 10.5, "whole number"), ("max_steps", True, "whole number"),
    ("learning_rate", "fast", "finite number"), ("learning_rate", float("nan"), "finite number"),
    ("hflip", "maybe", "true or false"), ("name", 5, "text"),
])
def test_uncoercible_values_name_the_setting(key, value, words):
    with pytest.raises(UserError) as e:
        load_config({key: value})
    assert f"'{key}'" in str(e.value) and words in str(e.value) and one_sentence(str(e.value))


def test_concept_value_errors_name_the_concept():
    with pytest.raises(UserError, match=r"'num_class_images' of concept 2 .*whole number"):
        load_config({"concepts": [{"instance_dir": "a"}, {"num_class_images": "lots"}]})


# --- unknown keys ----------------------------------------------------------------------------

def test_unknown_key_gives_one_sentence_with_suggestion(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"learnig_rate": 1e-6}))
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'learnig_rate'" in msg and "did you mean 'learning_rate'?" in msg and str(path) in msg
    assert one_sentence(msg)


def test_unknown_concept_key_and_misplaced_key():
    with pytest.raises(UserError, match=r"'instance_folder' in concept 1 .*did you mean 'instance_dir'\?"):
        load_config({"concepts": [{"instance_folder": "x"}]})
    with pytest.raises(UserError, match=r"'instance_dir' .* belongs inside each entry of 'concepts'"):
        load_config({"instance_dir": "x"})
    with pytest.raises(UserError, match="see --help"):
        load_config({"zzzzqqq": 1})


def test_broken_json_file_is_one_sentence(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"max_steps": 10,,}')
    with pytest.raises(UserError, match=r"not valid JSON \(line 1"):
        load_config(path)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.json")


# --- validation ------------------------------------------------------------------------------

def test_good_config_validates_without_warnings():
    assert validate(good_config()).warnings == []


@pytest.mark.parametrize("change, setting", [
    (dict(max_steps=0), "max_steps"),
    (dict(max_steps=-5), "max_steps"),
    (dict(learning_rate=-1e-6), "learning_rate"),
    (dict(lora_learning_rate=-1.0), "lora_learning_rate"),
    (dict(resolution=500), "resolution"),
    (dict(resolution=32), "resolution"),
    (dict(lora_rank=512), "lora_rank"),
    (dict(prior_loss_weight=-0.5), "prior_loss_weight"),
    (dict(ema_decay=1.5), "ema_decay"),
    (dict(optimizer="adam"), "optimizer"),
    (dict(lr_scheduler="cosine_annealing"), "lr_scheduler"),
    (dict(family="sd3"), "family"),
    (dict(save_format="pt"), "save_format"),
    (dict(name=""), "name"),
    (dict(name="runs/pixar"), "name"),
    (dict(name="..\\pixar"), "name"),
    (dict(name="pix:ar"), "name"),
    (dict(name="NUL"), "name"),
    (dict(name=" pixar"), "name"),
    (dict(checkpoint=""), "checkpoint"),
    (dict(concepts=[]), "concepts"),
    (dict(init_lora="old.safetensors"), "init_lora"),
    (dict(max_steps="ten"), "max_steps"),
])
def test_bad_values_raise_one_sentence_naming_the_setting(change, setting):
    with pytest.raises(UserError) as e:
        validate(good_config(**change))
    msg = str(e.value)
    assert f"'{setting}'" in msg, msg
    assert one_sentence(msg), msg


@pytest.mark.parametrize("change, setting", [
    (dict(instance_dir=""), "instance_dir"),
    (dict(instance_prompt=" "), "instance_prompt"),
    (dict(num_class_images=-1), "num_class_images"),
    (dict(caption_mode="tags"), "caption_mode"),
])
def test_bad_concept_values_name_setting_and_concept(change, setting):
    cfg = good_config()
    cfg.concepts.append(dataclasses.replace(cfg.concepts[0], **change))
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert f"'{setting}' of concept 2" in str(e.value) and one_sentence(str(e.value))


def test_choice_error_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'adamw8bit'"):
        validate(good_config(optimizer="adamw_8bit"))


def test_validate_gives_a_normalised_copy():
    cfg = good_config(max_steps=10.0, hflip="true")
    cfg.concepts = [dataclasses.asdict(cfg.concepts[0])]
    checked, warnings = validate(cfg)
    assert type(checked.max_steps) is int and checked.hflip is True and isinstance(checked.concepts[0], Concept)
    assert (cfg.max_steps, cfg.hflip, type(cfg.concepts[0])) == (10.0, "true", dict)  # the given one is unchanged
    assert validate(checked) == (checked, warnings)  # and a checked config checks the same


def test_trained_text_encoder_turns_embedding_cache_off():
    cfg = good_config(text_encoder_mode="full", cache_text_embeddings=True)
    checked, warnings = validate(cfg)
    assert checked.cache_text_embeddings is False and cfg.cache_text_embeddings is True
    assert any("cache_text_embeddings" in w for w in warnings)


@pytest.mark.parametrize("prompt, class_prompt, token, expect", [
    ("a sks_pixarstyle character", "a pixar-style character", "", None),
    ("a photo of sks dog", "a photo of a dog", "", None),
    ("a photo of ohwx man", "a photo of a man", "", None),
    ("a photo of a dog", "a photo of a dog", "", "no word its class prompt lacks"),
    ("a photo of a dog", "", "", "no rare token"),
    ("a photo of a cute dog", "a photo of a dog", "", "no rare token"),
    ("a photo of a cute dog", "a photo of a dog", "cute", None),
    ("a photo of a dog", "a photo of a dog", "sks", "does not contain its instance_token"),
    ("a photo of sks dog", "a photo of sks dog", "sks", "class prompt also contains its token"),
])
def test_token_warnings(prompt, class_prompt, token, expect):
    cfg = good_config(prior_loss_weight=0.0 if not class_prompt else 1.0)
    cfg.concepts[0] = Concept(instance_dir="d", instance_prompt=prompt, class_prompt=class_prompt, instance_token=token)
    warnings = [w for w in validate(cfg).warnings if "token" in w or "word" in w]
    if expect is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expect in warnings[0] and warnings[0].startswith("Concept 1")


def test_prior_preservation_warnings():
    cfg = good_config()
    cfg.concepts[0].class_prompt = ""
    assert any("no class prompt, so prior preservation is off" in w for w in validate(cfg).warnings)
    cfg = good_config()
    cfg.concepts[0].num_class_images = 0
    assert any("num_class_images 0" in w for w in validate(cfg).warnings)
    assert any("prior_loss_weight is 0" in w for w in validate(good_config(prior_loss_weight=0.0)).warnings)


def test_caption_modes():
    cfg = good_config()
    cfg.concepts[0].caption_mode = "filewords"
    assert any("captions are not used" in w for w in validate(cfg).warnings)
    cfg.concepts[0] = Concept(instance_dir="d", instance_prompt="", caption_mode="caption", class_prompt="a dog")
    assert validate(cfg).warnings == []


def test_default_paths():
    cfg = good_config(models_dir="/m")
    assert cfg.workspace_path().as_posix() == "/m/dreambooth/pixar"
    klass = cfg.class_path(cfg.concepts[0])
    assert klass.parent.as_posix() == "/m/dreambooth/pixar/class_images" and klass.name.startswith("a_pixar_style_character_")
    assert cfg.class_path(Concept(class_dir="/c")).as_posix() == "/c"
    assert good_config(workspace_dir="/w").workspace_path().as_posix() == "/w"


def test_effective_values():
    cfg = good_config()
    assert cfg.unet_learning_rate == cfg.learning_rate and cfg.effective_lora_alpha == cfg.lora_rank
    cfg = good_config(train_mode="lora", lora_alpha=4.0, text_encoder_mode="lora")
    assert cfg.unet_learning_rate == cfg.lora_learning_rate and cfg.effective_lora_alpha == 4.0
    assert cfg.text_encoder_learning_rate == cfg.text_encoder_lora_lr


# --- declarations ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [TrainConfig, Concept])
def test_every_field_has_help_and_a_group(cls):
    for info in describe(cls):
        assert info.help.strip().endswith((".", ")")), info.name
        assert info.group in GROUPS, info.name
        if info.choices:
            assert info.default in info.choices, info.name
        if info.min is not None:
            assert info.min <= info.default <= info.max, info.name


def test_defaults_declared_once_match_the_dataclass():
    infos = {i.name: i for i in describe()}
    assert infos["max_steps"].default == TrainConfig().max_steps == 800
    assert infos["concepts"].kind == "concepts" and infos["sample_seeds"].kind == "list[int]"
    assert TrainConfig().sample_prompts is not TrainConfig().sample_prompts  # fresh lists


# --- command line ----------------------------------------------------------------------------

def test_cli_flags_override_config_file(tmp_path):
    path = save_config(good_config(max_steps=300, hflip=True, learning_rate=5e-6, sample_prompts=["x"]),
                       tmp_path / "cfg.json")
    cfg = parse(["--config", str(path), "--steps", "50", "--no-hflip", "--lora", "--sample-prompts", "a", "b",
                 "--instance-prompt", "a zwx character"])
    assert cfg.max_steps == 50 and cfg.hflip is False and cfg.train_mode == "lora"
    assert cfg.sample_prompts == ["a", "b"]
    assert cfg.learning_rate == 5e-6  # not given on the command line: the file's value stays
    assert cfg.concepts[0].instance_prompt == "a zwx character"
    assert cfg.concepts[0].instance_dir == "data/pixar"


def test_cli_single_concept_flags_build_a_config():
    cfg = parse(["--checkpoint", "base.safetensors", "--name", "pixar", "--instance-dir", "imgs",
                 "--instance-prompt", "a sks_pixarstyle character", "--class-prompt", "a pixar-style character",
                 "--num-class-images", "10", "--models-dir", "out/models", "--resolution", "256",
                 "--max-steps", "20", "--learning-rate", "1e-3", "--gradient-checkpointing"])
    assert cfg.concepts == [Concept(instance_dir="imgs", instance_prompt="a sks_pixarstyle character",
                                    class_prompt="a pixar-style character", num_class_images=10)]
    assert (cfg.models_dir, cfg.resolution, cfg.max_steps, cfg.learning_rate) == ("out/models", 256, 20, 1e-3)
    assert cfg.gradient_checkpointing is True
    assert validate(cfg).warnings == []


def test_cli_without_flags_gives_defaults_and_help_renders():
    assert parse([]) == TrainConfig()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    assert "--max-steps" in text and "--no-bucketing" in text and "--instance-dir" in text


# --- recommendations -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["auto", "sd1", "sd2", "sd2-v", "sdxl"])
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("vram", [None, 6, 8, 12, 16, 24, 48, 80])
def test_recommended_gives_valid_settings(family, mode, vram):
    overrides = recommended(family, mode, vram)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(overrides) <= names
    cfg = load_config({**to_dict(good_config(family=family)), **overrides})
    _, warnings = validate(cfg)
    assert not any("cache_text_embeddings turned off" in w for w in warnings)


def test_recommended_fits_the_memory():
    sdxl12 = recommended("sdxl", "full", 12)
    assert sdxl12["train_mode"] == "lora" and sdxl12["gradient_checkpointing"] is True
    assert sdxl12["resolution"] == 1024 and sdxl12["train_batch_size"] == 1
    sd1_24 = recommended("sd1", "full", 24)
    assert sd1_24["train_mode"] == "full" and sd1_24["gradient_checkpointing"] is False
    sd1_12 = recommended("sd1", "full", 12)  # fp32 AdamW fits once the gradients are freed as they come
    assert sd1_12["optimizer"] == "adamw" and sd1_12["fused_backward_pass"] is True
    assert sd1_12["gradient_accumulation_steps"] == 1
    assert recommended("sd1", "full", 16)["fused_backward_pass"] is False  # not needed: a global norm to clip
    assert recommended("sd1", "full", 12, have_bf16=False)["optimizer"] == "adamw8bit"  # fp16 cannot fuse
    assert recommended("sd1", "full", 12, have_bitsandbytes=False, have_bf16=False)["optimizer"] == "adafactor"
    sdxl16 = recommended("sdxl", "full", 16)  # a full SDXL fine-tune in 16 GB only with the fused pass
    assert sdxl16["train_mode"] == "full" and sdxl16["fused_backward_pass"] is True
    assert recommended("sdxl", "full", 16, have_bf16=False)["train_mode"] == "lora"
    with pytest.raises(UserError, match="family"):
        recommended("flux", "full", 24)
