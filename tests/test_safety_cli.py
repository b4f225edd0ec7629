"""One sentence, never a traceback: odd settings files, odd file names, hostile pickles, long prompts."""

import os
import pickle

import pytest

from dreambooth_ext.cli import main
from dreambooth_ext.errors import UserError


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("content,phrase", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"seed": ' + "9" * 5000 + "}", "too many digits"),
    ('{"max_steps": 1e400}', "whole number"),
])
def test_hostile_settings_files_are_one_sentence(content, phrase, tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    assert main(["train", "--config", str(path)]) == 1
    line = _one_error_line(capsys)
    assert phrase in line and str(path) in line


def test_a_huge_integer_setting_is_named_not_printed(tmp_path):
    from dreambooth_ext.train.config_io import load_config
    from dreambooth_ext.train.config_checks import validate

    cfg = load_config({"seed": 10**5000, "checkpoint": "x", "name": "n",
                       "concepts": [{"instance_dir": "d", "instance_prompt": "a sks dog"}]})
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert "'seed'" in str(e.value) and "5000 digits" in str(e.value)


def test_a_folder_given_as_the_settings_file_says_so(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 1
    assert "is a folder" in _one_error_line(capsys)


def test_a_checkpoint_whose_name_is_not_utf8_is_read(tiny_checkpoints, tmp_path):
    from dreambooth_ext.bridge import single_file_to_diffusers

    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.safetensors")
    with open(tiny_checkpoints("sd1"), "rb") as src, open(odd, "wb") as dst:
        dst.write(src.read())
    with open(tiny_checkpoints("sd1").with_suffix(".yaml"), "rb") as src, open(odd[:-12] + ".yaml", "wb") as dst:
        dst.write(src.read())
    report = single_file_to_diffusers(odd, tmp_path / "out")
    assert report.tensors > 0 and (tmp_path / "out" / "model_index.json").is_file()


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_the_pickle_refusal_is_whole_and_plain(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Evil()}, f, protocol=2)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    line = _one_error_line(capsys)
    assert "\x1b" not in line and line.endswith("use a .safetensors version of this model.")
    assert "system" in line and "Nothing in it was executed" in line


def test_a_prompt_over_75_tokens_is_warned_once_naming_its_file(tiny_checkpoints, tmp_path):
    from dreambooth_ext.train.run import train
    from tests.recording import RecordingReporter
    from tests.trainer_helpers import DEMO, small_config

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(DEMO.glob("*.png"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    long_caption = folder / sorted(DEMO.glob("*.png"))[0].with_suffix(".txt").name
    long_caption.write_text("a sks_pixarstyle character " + "with a red hat " * 30)
    cfg = small_config(tmp_path, tiny_checkpoints("sd1"), instance_dir=folder, max_steps=1, num_class_images=0)
    cfg.concepts[0].caption_mode = "caption"
    reporter = RecordingReporter()
    train(cfg, reporter)
    long = [w for w in reporter.warnings if "first 75" in w]
    assert len(long) == 1 and str(long_caption) in long[0]
