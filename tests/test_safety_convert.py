"""`convert`: never over its own source, only over the same kind of output, refusals before the work."""

import pytest

from dreambooth_ext.bridge import diffusers_to_single_file, single_file_to_diffusers
from dreambooth_ext.cli import main
from dreambooth_ext.errors import Cancelled


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def folder(tiny_checkpoints, tmp_path):
    out = tmp_path / "diffusers"
    single_file_to_diffusers(tiny_checkpoints("sd1"), out)
    return out


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


def test_source_and_destination_must_not_overlap(folder, tiny_checkpoints, tmp_path, capsys):
    src = tmp_path / "a" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(tiny_checkpoints("sd1").read_bytes())
    before = _tree(tmp_path / "a"), _tree(folder)
    cases = [
        ([str(src), str(src), "--overwrite"], "is the source itself"),
        ([str(src), str(tmp_path / "a"), "--overwrite"], "is inside the destination"),
        ([str(folder), str(folder / "unet" / "x.safetensors"), "--overwrite"], "inside the source"),
    ]
    for argv, phrase in cases:
        assert main(["convert", *argv]) == 1
        assert phrase in _one_error_line(capsys)
    assert (_tree(tmp_path / "a"), _tree(folder)) == before


def test_overwrite_never_deletes_a_folder_of_other_files(tiny_checkpoints, tmp_path, capsys):
    mine = tmp_path / "holiday"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"precious")
    assert main(["convert", str(tiny_checkpoints("sd1")), str(mine), "--overwrite"]) == 1
    assert "not a diffusers model folder" in _one_error_line(capsys)
    assert (mine / "photo.jpg").read_bytes() == b"precious"


def test_overwrite_replaces_a_diffusers_folder_and_a_checkpoint_file(folder, tiny_checkpoints, tmp_path):
    (folder / "stale.txt").write_text("from before")
    single_file_to_diffusers(tiny_checkpoints("sd1"), folder, overwrite=True)
    assert (folder / "model_index.json").is_file() and not (folder / "stale.txt").exists()
    out = tmp_path / "x.safetensors"
    diffusers_to_single_file(folder, out)
    diffusers_to_single_file(folder, out, overwrite=True)
    assert out.is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".previous-" in p.name]


def test_overwrite_never_replaces_a_file_that_is_not_a_checkpoint(folder, tmp_path, capsys):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes, badly named")
    assert main(["convert", str(folder), str(notes), "--overwrite"]) == 1
    assert "not a checkpoint file" in _one_error_line(capsys)
    assert notes.read_text() == "my notes, badly named"


def test_an_existing_file_where_a_folder_goes_is_refused_before_the_work(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    from dreambooth_ext.bridge import to_diffusers

    target = tmp_path / "model.safetensors"
    target.write_bytes(tiny_checkpoints("sd1").read_bytes())  # built before the patch below
    monkeypatch.setattr(to_diffusers, "open_checkpoint", lambda *_: pytest.fail("converted before refusing"))
    assert main(["convert", str(tiny_checkpoints("sd1")), str(target), "--overwrite"]) == 1
    assert "not a diffusers model folder" in _one_error_line(capsys)
    assert main(["convert", str(tiny_checkpoints("sd1")), str(target)]) == 1
    assert "already exists; pass --overwrite" in _one_error_line(capsys)


def test_a_read_only_destination_is_one_sentence(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    from dreambooth_ext.bridge import destination

    ck = tiny_checkpoints("sd1")
    monkeypatch.setattr(destination.os, "access", lambda *_: False)  # tests run as root: chmod is no test
    assert main(["convert", str(ck), str(tmp_path / "ro" / "out")]) == 1
    assert "read-only or not yours" in _one_error_line(capsys)


def test_a_read_only_folder_at_write_time_is_one_sentence(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    import errno

    from dreambooth_ext.bridge import tensor_io

    def refuse(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    from dreambooth_ext.bridge import to_diffusers

    ck = tiny_checkpoints("sd1")
    monkeypatch.setattr(tensor_io, "write_safetensors_stream", refuse)
    monkeypatch.setattr(to_diffusers, "write_safetensors_stream", refuse)
    assert main(["convert", str(ck), str(tmp_path / "out")]) == 1
    assert "cannot be written" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_stop_during_conversion_leaves_nothing(tiny_checkpoints, tmp_path):
    asked = {"n": 0}

    def stop():
        asked["n"] += 1
        return asked["n"] > 3

    with pytest.raises(Cancelled):
        single_file_to_diffusers(tiny_checkpoints("sd1"), tmp_path / "out", should_stop=stop)
    assert list(tmp_path.iterdir()) == []


def test_convert_removes_what_a_killed_conversion_left(tiny_checkpoints, tmp_path, capsys):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f".out.partial-{p.pid}"
    stale.mkdir()
    (stale / "model_index.json").write_text("{}")
    assert main(["convert", str(tiny_checkpoints("sd1")), str(tmp_path / "out")]) == 0
    assert not stale.exists() and (tmp_path / "out" / "model_index.json").is_file()
