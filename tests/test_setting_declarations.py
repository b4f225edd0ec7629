"""Settings describe themselves: every list of setting names or values elsewhere comes from the declarations.

A new setting declared with path=True or resumable=True, or a new choice, is picked up by the API's path
check, by resume and by every module that checks a choice, without anyone listing it again.
"""

import argparse
import dataclasses
import json
from typing import List

import pytest

from dreambooth_ext import cli
from dreambooth_ext.errors import UserError
from dreambooth_ext.folders import check_paths, path_settings
from dreambooth_ext.train import captions, precision, state
from dreambooth_ext.train.config import Concept, TrainConfig, choices_of, declared, describe, setting
from dreambooth_ext.train.config_cli import add_arguments

# What may change on resume: when to sample and save, where results go, memory and speed.
RESUMABLE = {
    "max_steps", "max_epochs", "sample_every", "sample_prompts", "sample_negative_prompt", "sample_seeds",
    "num_sample_images", "sample_steps", "sample_guidance", "save_model_every", "save_state_every", "save_format",
    "save_dtype", "save_lora_merged", "keep_last_models", "save_model_on_interrupt", "models_dir", "checkpoint_dir",
    "lora_dir", "gradient_checkpointing", "attention", "cache_text_embeddings", "monitor_clip_model",
}


def test_resume_keeps_the_settings_declared_resumable():
    assert state.RESUMABLE_CHANGES == RESUMABLE == {s.name for s in describe(TrainConfig) if s.resumable}
    assert state.CONCEPT_RESUMABLE_CHANGES == {"concept_sample_prompts"}
    saved = state.resumable_config(TrainConfig(concepts=[Concept(instance_dir="d")]))
    assert not RESUMABLE & set(saved) and "learning_rate" in saved
    assert "concept_sample_prompts" not in saved["concepts"][0] and "instance_dir" in saved["concepts"][0]


@dataclasses.dataclass
class _Extended(TrainConfig):
    """TrainConfig with two settings added the way any new one would be."""

    preview_folder: str = setting("", "A folder the run writes previews to.", "samples", path=True, resumable=True)
    preview_every: int = setting(0, "Previews every this many steps.", "samples", min=0, resumable=True)
    new_rule: int = setting(0, "Changes what the steps compute.", "training", min=0)


def test_a_new_setting_is_picked_up_from_its_declaration_alone():
    assert "preview_folder" in path_settings(_Extended) and "preview_every" not in path_settings(_Extended)
    assert {"preview_folder", "preview_every"} <= set(declared("resumable", _Extended))
    saved = state.resumable_config(_Extended(preview_folder="a", preview_every=5, new_rule=1))
    assert "preview_folder" not in saved and "preview_every" not in saved and saved["new_rule"] == 1


def test_every_path_setting_is_checked_by_the_api(tmp_path):
    inside = tmp_path / "inside"
    data = {name: str(tmp_path / "elsewhere") for name in declared("path")}
    for name in declared("path"):
        with pytest.raises(UserError, match=f"'{name}'"):
            check_paths({name: data[name]}, [inside])
    for name in declared("path", Concept):
        with pytest.raises(UserError, match=f"'{name} of concept 1'"):
            check_paths({"concepts": [{name: str(tmp_path / "elsewhere")}]}, [inside])


def test_choice_lists_come_from_the_declarations():
    assert precision.PRECISIONS == choices_of("mixed_precision")
    assert precision.ATTENTIONS == choices_of("attention")
    assert captions.MODES == choices_of("caption_mode", Concept)
    with pytest.raises(KeyError):
        choices_of("max_steps")  # a setting without choices


def _choices(parser: argparse.ArgumentParser, flag: str) -> List[str]:
    for action in parser._actions:
        if flag in action.option_strings:
            return list(action.choices)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found = _choices(sub, flag)
                if found:
                    return found
    return []


@pytest.mark.parametrize("flag, name", [("--family", "family"), ("--dtype", "save_dtype")])
def test_the_convert_command_offers_the_declared_choices(flag, name):
    parser = cli.build_parser()
    convert = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["convert"]
    assert tuple(_choices(convert, flag)) == choices_of(name)


def test_every_setting_with_choices_offers_them_on_the_command_line():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for s in describe(TrainConfig):
        if s.choices:
            assert _choices(parser, "--" + s.name.replace("_", "-")) == s.choices, s.name


@pytest.mark.parametrize("prompt", ["a photo of sks [filewords]", "a photo of sks [FILEWORDS]",
                                    "a photo of sks [Filewords]"])
def test_filewords_is_read_in_any_case_by_the_checks_as_by_the_captions(prompt):
    from dreambooth_ext.train.config_checks import validate

    def config(mode):
        concept = Concept(instance_dir="d", instance_prompt=prompt, caption_mode=mode)
        return TrainConfig(checkpoint="m.safetensors", name="n", concepts=[concept])

    assert captions.build_prompt(prompt, "red", "filewords") == "a photo of sks red"
    assert not any("captions are not used" in w for w in validate(config("filewords")).warnings)
    assert any("so it is dropped" in w for w in validate(config("prompt")).warnings)


# --- a retired setting ---------------------------------------------------------------------------

def test_a_saved_config_with_the_retired_dataloader_workers_still_loads(tmp_path):
    from dreambooth_ext.train.config_io import load_config, to_dict

    assert "dataloader_workers" not in {s.name for s in describe(TrainConfig)}
    saved = {**to_dict(TrainConfig(name="old", max_steps=7)), "dataloader_workers": 4}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(saved), encoding="utf-8")
    assert load_config(path) == load_config(saved) == TrainConfig(name="old", max_steps=7)
    assert load_config({"dataloader-workers": 2}) == TrainConfig()  # the CLI spelling too
    with pytest.raises(UserError, match="Unknown setting .dataloader_workers. in concept 1"):
        load_config({"concepts": [{"instance_dir": "d", "dataloader_workers": 2}]})  # never a concept's
    with pytest.raises(UserError, match="Unknown setting 'dataloader_worker'"):
        load_config({"dataloader_worker": 2})  # other unknown keys are still refused


def test_an_old_state_holding_dataloader_workers_still_resumes():
    cfg = TrainConfig(name="old", concepts=[Concept(instance_dir="d")])
    current = state.resumable_config(cfg)
    assert "dataloader_workers" not in current
    assert state.check_resumable({**current, "dataloader_workers": 2}, current) == []
    assert state.check_resumable({**current, "learning_rate": 1.0}, current) == ["learning_rate"]


def test_the_host_fills_the_folders_the_form_leaves_out():
    from dreambooth_ext.folders import HOST_FOLDERS, apply_host_folders
    from dreambooth_ext.ui.form import HOST_SETTINGS, top_settings

    class Host:
        def __getattr__(self, name):
            return lambda: None if name == "workspace_root" else f"/host/{name}"

    assert HOST_SETTINGS == HOST_FOLDERS and set(HOST_FOLDERS) <= set(declared("path"))
    assert apply_host_folders({}, Host()) == {key: f"/host/{key}" for key in HOST_FOLDERS}
    assert not set(HOST_FOLDERS) & {s.name for s in top_settings()}


def test_tables_keyed_by_a_settings_choices_cover_exactly_those_choices():
    """Tables that must hold one entry per choice (they are data, not lists to keep in step by hand)."""
    from dreambooth_ext.train.lora import UNET_PRESETS
    from dreambooth_ext.train.memory import PARAMETERS

    assert tuple(UNET_PRESETS) == choices_of("lora_targets")
    families = [f for f in choices_of("family") if f != "auto"]
    assert sorted(PARAMETERS) == sorted(families)
    for family in families:
        assert set(choices_of("lora_targets")) <= set(PARAMETERS[family])
