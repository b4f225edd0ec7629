"""The package's one writer: a temporary sibling renamed into place; a failure leaves no temporary and is one sentence."""

import errno
import json
import os
from pathlib import Path

import pytest

from dreambooth_ext import atomic
from dreambooth_ext.errors import UserError


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".previous-" in p.name]


def test_write_text_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic.write_text(path, "one")
    atomic.write_text(path, "two")
    assert path.read_text(encoding="utf-8") == "two" and _leftovers(path.parent) == []


def test_a_full_disk_is_one_sentence_naming_the_file_and_the_old_copy_stays(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text("old")

    def full(self, *a, **k):
        Path.write_bytes(self, b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError) as e:
        atomic.write_text(path, "new", "the settings file")
    assert "disk filled up while writing the settings file a.json" in str(e.value)
    assert "previous one is unchanged" in str(e.value)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_save_config_on_a_full_disk_is_a_user_error(tmp_path, monkeypatch):
    from dreambooth_ext.train.config import TrainConfig
    from dreambooth_ext.train.config_io import save_config

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match="disk filled up while writing the settings file cfg.json"):
        save_config(TrainConfig(), tmp_path / "cfg.json")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_one_sentence(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UserError, match="cannot be written .*read-only or not yours.*nothing was written there"):
        atomic.write_text(tmp_path / "a.txt", "x")
    assert _leftovers(tmp_path) == []


def test_a_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "state"
    with atomic.atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "one").write_text("1")
    with atomic.atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "two").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["two"] and _leftovers(tmp_path) == []


def test_create_new_never_replaces(tmp_path):
    path = tmp_path / "card.json"
    assert atomic.create_new(path, json.dumps({"a": 1}))
    assert not atomic.create_new(path, "theirs")
    assert json.loads(path.read_text()) == {"a": 1} and _leftovers(tmp_path) == []


def test_create_new_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "run.lock"
    assert atomic.create_new(path, "mine")
    assert not atomic.create_new(path, "second")
    assert path.read_text() == "mine" and _leftovers(tmp_path) == []
