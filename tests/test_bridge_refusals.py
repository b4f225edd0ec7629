"""Family detection, and bad input: one clear sentence, no code run, nothing written."""

import errno
import os
import pickle

import pytest
import torch

from dreambooth_ext.bridge import detect_family, single_file_to_diffusers, diffusers_to_single_file
from dreambooth_ext.errors import UserError
from tests.helpers import load_any


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("family,expected", [("sd1", "sd1"), ("sd2", "sd2"), ("sd2-v", "sd2"), ("sdxl", "sdxl")])
def test_detects_each_family(family, expected, tiny_checkpoints):
    d = detect_family(shapes_of(load_any(tiny_checkpoints(family))))
    assert d.family == expected and not d.inpainting
    assert bool(d.notes) == (expected == "sd2")  # only SD2 leaves epsilon vs v open


@pytest.mark.parametrize("keys,phrase", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "LoRA"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (3, 3), "model.diffusion_model.x_embedder.proj.weight": (3, 3)}, "Stable Diffusion 3"),
    ({"double_blocks.0.img_attn.qkv.weight": (3, 3), "img_in.weight": (3, 3)}, "Flux"),
    ({"encoder.down.0.block.0.conv1.weight": (3, 3), "decoder.up.0.block.0.conv1.weight": (3, 3)}, "VAE"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}, "refiner"),
    ({"emb_params": (1, 768)}, "textual-inversion"),
    ({"some.other.weight": (2, 2)}, "not a Stable Diffusion"),
])
def test_refuses_other_kinds_of_file(keys, phrase):
    with pytest.raises(UserError) as e:
        detect_family(keys, "thing.safetensors")
    msg = str(e.value)
    assert msg.startswith("thing.safetensors is ") and phrase in msg and "\n" not in msg


def test_corrupt_and_truncated_files(tmp_path, tiny_checkpoints):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    data = tiny_checkpoints("sd1").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    zipcut = tmp_path / "cut.ckpt"
    torch.save({"state_dict": load_any(tiny_checkpoints("sd1"))}, str(tmp_path / "whole.ckpt"))
    zipcut.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:20000])
    for path in (junk, cut, zipcut):
        dst = tmp_path / ("out-" + path.stem + path.suffix)
        with pytest.raises(UserError) as e:
            single_file_to_diffusers(path, dst)
        assert path.name in str(e.value)
        assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.ckpt", "cut.safetensors", "junk.safetensors", "whole.ckpt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EVIL_MARKER"],))


def test_malicious_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, str(ckpt))
    legacy = tmp_path / "evil-legacy.ckpt"
    with open(legacy, "wb") as f:
        pickle.dump({"payload": _Evil()}, f)
    for path in (ckpt, legacy):
        with pytest.raises(UserError) as e:
            single_file_to_diffusers(path, tmp_path / "out")
        assert "refused" in str(e.value) and "Nothing in it was executed" in str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


class ModelCheckpoint:
    """Pickled under pytorch_lightning's name, as real training .ckpt files hold it."""

    def __init__(self):
        self.best_model_score = 1.0


ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"


def test_lightning_training_ckpt_loads_without_its_classes(tmp_path, tiny_checkpoints):
    """Real training .ckpt files carry a ModelCheckpoint callback; it is read as inert, never imported."""
    import shutil
    import sys
    import types

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", ModelCheckpoint.__module__]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[ModelCheckpoint.__module__].ModelCheckpoint = ModelCheckpoint
    try:
        path = tmp_path / "trained.ckpt"
        torch.save({"state_dict": load_any(tiny_checkpoints("sd1")), "global_step": 10,
                    "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, str(path))
    finally:
        for name in names:
            del sys.modules[name]
    assert "pytorch_lightning" not in sys.modules
    shutil.copy2(tiny_checkpoints("sd1").with_suffix(".yaml"), path.with_suffix(".yaml"))
    report = single_file_to_diffusers(path, tmp_path / "d")
    assert report.family == "sd1"


def test_shape_mismatch_against_shipped_config_names_the_fix(tiny_checkpoints, tmp_path):
    import shutil

    src = tmp_path / "noyaml.safetensors"
    shutil.copy2(tiny_checkpoints("sd1"), src)  # tiny weights, but no beside-yaml
    with pytest.raises(UserError) as e:
        single_file_to_diffusers(src, tmp_path / "out")
    msg = str(e.value)
    assert "shipped sd1 config" in msg and "noyaml.yaml" in msg and "shape" in msg
    assert not (tmp_path / "out").exists()


def test_wrong_family_flag(tiny_checkpoints, tmp_path):
    with pytest.raises(UserError) as e:
        single_file_to_diffusers(tiny_checkpoints("sd1"), tmp_path / "out", family="sdxl")
    assert "SD1.x" in str(e.value)


def test_full_disk_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    from dreambooth_ext.bridge import tensor_io

    folder = tmp_path / "d"
    single_file_to_diffusers(tiny_checkpoints("sd1"), folder)
    real = tensor_io._tensor_bytes
    calls = {"n": 0}

    def fill_up(t):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(t)

    monkeypatch.setattr(tensor_io, "_tensor_bytes", fill_up)
    out = tmp_path / "models" / "trained.safetensors"
    with pytest.raises(UserError) as e:
        diffusers_to_single_file(folder, out)
    assert "disk filled up" in str(e.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_existing_destination_is_not_clobbered(tiny_checkpoints, tmp_path):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(UserError):
        single_file_to_diffusers(tiny_checkpoints("sd1"), dst)
    assert (dst / "keep.txt").read_text() == "mine"


def test_cli_exit_codes(tiny_checkpoints, tmp_path, capsys):
    from dreambooth_ext.cli import main

    assert main(["convert", str(tiny_checkpoints("sd1")), str(tmp_path / "d")]) == 0
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "x.safetensors")]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.safetensors" in err[0]


def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_is_read_as_safetensors(tmp_path):
    """The header length is 8 little-endian bytes; when its low byte is 0x80 (one file in 256) the file
    starts with the pickle protocol marker, and must still be read as safetensors."""
    import struct

    import torch
    from safetensors.torch import save_file

    from dreambooth_ext.bridge.tensor_io import open_checkpoint, sniff_format

    path = tmp_path / "m.safetensors"
    for pad in range(300):  # metadata of growing length until the header's length ends in 0x80
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80 and struct.unpack("<Q", path.read_bytes()[:8])[0] > 0
    assert sniff_format(path) == "safetensors"
    assert list(open_checkpoint(path).keys()) == ["w"]
