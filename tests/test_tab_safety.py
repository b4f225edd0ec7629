"""The tab's buttons against careless and hostile values: settings files only inside the host's folders,
the host's folders applied to every run, and one sentence (never a traceback) for bad input.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("gradio")

from dreambooth_ext.errors import UserError  # noqa: E402
from dreambooth_ext.jobs import JobRunner  # noqa: E402
from dreambooth_ext.ui.handlers import Handlers  # noqa: E402
from tests.test_tab import DEMO, FakeHost  # noqa: E402


class WorkspaceHost(FakeHost):
    """A host with Settings > DreamBooth's workspace folder and --ckpt-dir/--lora-dir of its own."""

    def __init__(self, root: Path, extra: Path):
        super().__init__(root)
        self.extra = extra

    def checkpoint_dir(self):
        return self.extra / "ckpts"

    def lora_dir(self):
        return self.extra / "loras"

    def workspace_root(self):
        return self.extra / "spaces"


@pytest.fixture
def tab(tmp_path):
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "notes.json").write_text('{"mine": true}')
    host = FakeHost(models)
    base = models / "Stable-diffusion" / "base.safetensors"
    base.parent.mkdir()
    save_file({"w": torch.zeros(1)}, str(base))
    host.active = str(base)
    return Handlers(host, JobRunner()), host, outside


def _form(h: Handlers, **changes):
    form = h.initial_form()
    form.update({"name": "safe", "concept1.instance_dir": str(DEMO), "concept1.instance_prompt": "a sks toy"})
    form.update(changes)
    return form


def _listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_save_only_inside_the_hosts_folders(tab):
    h, host, outside = tab
    form = _form(h)
    link = host.models_dir() / "link"
    link.symlink_to(outside, target_is_directory=True)
    for path in (str(outside / "cfg.json"), str(host.models_dir() / ".." / "outside" / "cfg.json"),
                 str(link / "cfg.json"), str(outside / "notes.json")):
        reply, shown = h.save(form, [], path)
        assert not reply.ok and reply.text == (
            f"Not saved: The settings file {path} is outside the WebUI's models folder, the extension's folder and "
            "the data folders in Settings > DreamBooth; move it there or add its folder."), reply.text
    assert _listing(outside) == ["notes.json"] and json.loads((outside / "notes.json").read_text()) == {"mine": True}


def test_save_never_replaces_a_file_of_something_else(tab):
    h, host, _ = tab
    other = host.models_dir() / "Stable-diffusion" / "model.json"
    other.write_text('{"not": "ours"}')
    reply, _ = h.save(_form(h), [], str(other))
    assert not reply.ok and reply.text == f"Not saved: {other} exists and is not a DreamBooth settings file; " \
                                          "choose another name."
    assert other.read_text() == '{"not": "ours"}'
    base = host.models_dir() / "Stable-diffusion" / "base.safetensors"
    before = base.read_bytes()
    reply, _ = h.save(_form(h), [], str(base))
    assert not reply.ok and "Settings files end in .json" in reply.text and base.read_bytes() == before
    ours = host.models_dir() / "configs" / "run.json"
    assert h.save(_form(h), [], str(ours))[0].ok
    assert h.save(_form(h, max_steps=9), [], str(ours))[0].ok  # our own settings file may be saved again
    assert json.loads(ours.read_text())["max_steps"] == 9


def test_a_nul_in_the_path_is_one_sentence(tab):
    h, host, _ = tab
    path = str(host.models_dir() / "a\x00b.json")
    reply, _ = h.save(_form(h), [], path)
    assert not reply.ok and reply.text == f"Not saved: The path {path!r} contains a NUL character; type the path " \
                                          "again without it."
    form, _, reply = h.load(path)
    assert form is None and "contains a NUL character" in reply.text


def test_load_tells_nothing_about_files_outside(tab):
    h, host, outside = tab
    for path in (str(outside / "notes.json"), str(outside / "missing.json")):
        form, extras, reply = h.load(path)
        assert form is None and not reply.ok
        assert reply.text == (f"The settings file {path} is outside the WebUI's models folder, the extension's "
                              "folder and the data folders in Settings > DreamBooth; move it there or add its folder.")


def test_the_hosts_folders_apply_to_every_run(tmp_path):
    host = WorkspaceHost(tmp_path / "models", tmp_path)
    h = Handlers(host, JobRunner())
    cfg = h.config(_form(h))
    assert (cfg.checkpoint_path(), cfg.lora_path(), cfg.workspace_path()) == (
        tmp_path / "ckpts", tmp_path / "loras", tmp_path / "spaces" / "safe")
    assert h.default_config_path(_form(h)) == str(tmp_path / "spaces" / "safe" / "config.json")
    reply, path = h.save(_form(h), [], "")
    assert reply.ok and path == str(tmp_path / "spaces" / "safe" / "config.json")


@pytest.mark.parametrize("memory", ["lots", -4, "-4", math.nan, "nan", math.inf, 0])
def test_recommend_with_odd_memory_is_one_sentence(tab, memory):
    h, _, _ = tab
    form = _form(h)
    filled, reply = h.recommend(form, "sd1", "lora", memory)
    assert filled == form and not reply.ok
    assert reply.text == ("GPU memory must be a number of GB such as 8, 12 or 24 (or empty when unknown), "
                          f"not {memory!r}.")


def test_a_refusal_at_the_runners_start_is_the_reply(tab):
    """Train and Resume show what the runner refuses before any work, word for word."""
    h, host, _ = tab

    class Refusing(JobRunner):
        def start(self, cfg, **kwargs):
            raise UserError("The saved run of 'safe' used other settings (resolution); give the new run another name.")

    h.runner = Refusing()
    for resume in (False, True):
        reply = h.train(_form(h), resume=resume)
        assert not reply.ok and reply.text == ("The saved run of 'safe' used other settings (resolution); give the "
                                               "new run another name.")


def test_an_unreadable_progress_file_does_not_break_resume(tab):
    h, host, _ = tab
    progress = host.models_dir() / "dreambooth" / "safe" / "state" / "progress.json"
    progress.parent.mkdir(parents=True)
    progress.write_text("{broken")

    class Refusing(JobRunner):
        def start(self, cfg, **kwargs):
            raise UserError("progress.json of 'safe' is not readable; delete the state folder to start afresh.")

    h.runner = Refusing()
    reply = h.train(_form(h), resume=True)
    assert not reply.ok and reply.text.startswith("progress.json of 'safe' is not readable")


class OpenHost(FakeHost):
    """A page others can open (the WebUI's --listen or --share)."""

    def non_local(self):
        return True


def test_a_page_open_to_others_keeps_runs_inside_the_hosts_folders(tab, tmp_path):
    h, host, outside = tab
    local_reply = Handlers(host, h.runner).config(_form(h, **{"concept1.class_dir": str(outside / "class")}))
    assert local_reply.concepts[0].class_dir == str(outside / "class")  # on one's own machine any folder goes
    open_host = OpenHost(host.models_dir())
    open_host.active = host.active
    started = []

    class Recording(JobRunner):
        def start(self, cfg, **kwargs):
            started.append(cfg)

    h2 = Handlers(open_host, Recording())
    inside = host.models_dir() / "data" / "dog"
    inside.mkdir(parents=True)
    reply = h2.train(_form(h2, **{"concept1.instance_dir": str(inside), "concept1.class_dir": str(outside / "class")}))
    assert not reply.ok and reply.text == (
        f"Setting 'class_dir of concept 1' ({outside / 'class'}) is outside the WebUI's models folder, the "
        "extension's folder and the data folders in Settings > DreamBooth; move it there or add its folder.")
    assert started == [] and _listing(outside) == ["notes.json"]
    assert h2.train(_form(h2, **{"concept1.instance_dir": str(inside)})).ok and len(started) == 1


def test_the_webui_says_when_it_is_open_to_others(monkeypatch, tmp_path):
    from tests.webui_fixtures import DOUBLE
    import sys

    monkeypatch.syspath_prepend(str(DOUBLE))
    for name in list(sys.modules):
        if name.split(".")[0] == "modules":
            monkeypatch.delitem(sys.modules, name)
    from modules import shared

    from dreambooth_ext.host.webui import WebUIHost

    assert not WebUIHost("a1111").non_local()
    monkeypatch.setattr(shared.cmd_opts, "webui_is_non_local", True)
    assert WebUIHost("a1111").non_local()
    monkeypatch.delattr(shared.cmd_opts, "webui_is_non_local")  # SD.Next: the flags themselves
    monkeypatch.setattr(shared.cmd_opts, "listen", True)
    assert WebUIHost("sdnext").non_local()


def test_the_standalone_page_served_beyond_this_machine_keeps_to_its_folder(tmp_path):
    from dreambooth_ext.host.standalone import StandaloneHost

    assert not StandaloneHost(tmp_path, offer_tiny=False).non_local()
    host = StandaloneHost(tmp_path, offer_tiny=False, non_local=True)
    assert host.non_local() and host.allowed_roots()[0] == tmp_path.resolve()


def test_a_poll_sends_only_the_newest_samples(tab):
    from types import SimpleNamespace

    from dreambooth_ext.ui.handlers import GALLERY_ITEMS

    h, _, _ = tab

    def chatty(cfg, job):
        job.start(0, 1)
        for i in range(500):
            job.sample(f"/w/samples/step_{i:06d}/0-1.png", "p", 1, i)
        return SimpleNamespace(status="finished", step=1)

    h.runner = JobRunner(train_fn=chatty)
    h.runner.start(SimpleNamespace(name="x", max_steps=1), background=False)
    view = h.poll()
    assert len(view.samples) == GALLERY_ITEMS and view.samples[0] == ("/w/samples/step_000499/0-1.png", "step 499")
