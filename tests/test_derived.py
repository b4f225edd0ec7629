"""Derived seeds and the prompt hash are pinned: a change would alter every resumed run's draws and
rename or regenerate the class images users already have."""

from dreambooth_ext.train.class_images import class_image_name, image_seed
from dreambooth_ext.train.config import Concept, TrainConfig
from dreambooth_ext.train.derived import derived_seed, prompt_hash


def test_the_run_seeds_are_those_of_earlier_versions():
    assert derived_seed(1234, "noise", "inst", 7) == 336258000744950424


def test_class_images_keep_their_seeds_and_names():
    assert image_seed(11, "a photo of a dog", 2) == 7497673430768673304
    assert class_image_name("a photo of a dog", 2) == "class_00002-157bd4f9.png"


def test_the_default_class_folder_carries_the_same_prompt_hash():
    cfg = TrainConfig(workspace_dir="/w")
    assert cfg.class_path(Concept(class_prompt="a photo of a dog")).name == f"a_photo_of_a_dog_{prompt_hash('a photo of a dog')}"
