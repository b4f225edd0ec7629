"""Small rules that live in one place: derived seeds and the prompt hash (pinned: a change would alter
every resumed run's draws and rename or regenerate the class images users already have), and the
checkpoint suffixes."""

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


def test_checkpoint_names_in_any_case():
    from dreambooth_ext.bridge import checkpoint_suffix, is_checkpoint_name

    assert is_checkpoint_name("a/b.safetensors") and is_checkpoint_name("B.CKPT")
    assert not is_checkpoint_name("a.yaml") and not is_checkpoint_name("safetensors")
    assert checkpoint_suffix("ckpt") == ".ckpt" and checkpoint_suffix("safetensors") == ".safetensors"


def test_within_follows_symlinks_and_dots(tmp_path):
    from dreambooth_ext.paths import within, within_any

    inner, outer = tmp_path / "models", tmp_path / "elsewhere"
    inner.mkdir()
    outer.mkdir()
    (inner / "link").symlink_to(outer)
    assert within(inner, inner) and within(inner / "a" / "b.safetensors", inner)
    assert not within(inner / "link" / "x", inner)  # a symlink leads out
    assert not within(inner / ".." / "elsewhere", inner)
    assert within(inner / "link" / "x", outer) and within_any(outer / "x", [inner, outer])
    assert not within(tmp_path / "models2", inner)  # a name that only starts like the folder


def test_the_dtype_choices_of_the_settings_are_the_dtype_table():
    """config.py declares its dtype choices without importing torch; they must name the table's dtypes."""
    from dreambooth_ext.dtypes import DTYPES, NO_MIXED_PRECISION
    from dreambooth_ext.train.config import choices_of

    assert set(choices_of("save_dtype")) == set(DTYPES)
    assert set(choices_of("mixed_precision")) == {"auto", NO_MIXED_PRECISION} | (set(DTYPES) - {"fp32"})
