"""The DreamBooth tab without a browser: it builds, its form round-trips a config, and its handlers train.

Runs under gradio 3.41 (A1111) and 4.40 (Forge) alike.
"""

import json
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from dreambooth_ext.hostapi import Host  # noqa: E402
from dreambooth_ext.jobs import JobRunner  # noqa: E402
from dreambooth_ext.plot import loss_plot  # noqa: E402
from dreambooth_ext.train.config import Concept, TrainConfig, describe  # noqa: E402
from dreambooth_ext.train.config_io import load_config, to_dict
from dreambooth_ext.train.config_checks import validate  # noqa: E402
from dreambooth_ext.ui import form as F  # noqa: E402
from dreambooth_ext.ui.handlers import Handlers, status_text  # noqa: E402
from dreambooth_ext.ui.tab import Tab, build_tab  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "dreambooth_ext" / "data" / "demo" / "instance"
WIDGETS = {"checkbox": gr.Checkbox, "dropdown": gr.Dropdown, "slider": gr.Slider, "number": gr.Number,
           "text": gr.Textbox, "lines": gr.Textbox, "csv": gr.Textbox}


class FakeHost(Host):
    """A host that records what the tab asks of it."""

    name = "fake"

    def __init__(self, root: Path):
        self.root = root
        self.calls = []
        self.active = None
        self.on_progress = None  # called with the training step from progress_update, in the training thread

    def models_dir(self):
        return self.root

    def list_checkpoints(self):
        return [(p.name, str(p)) for p in sorted(self.checkpoint_dir().glob("*.safetensors"))]

    def active_checkpoint(self):
        return self.active

    def refresh_checkpoints(self):
        self.calls.append(("refresh",))

    def set_active_checkpoint(self, path):
        self.calls.append(("activate", path))
        self.active = path
        return True

    def progress_begin(self, title, total):
        self.calls.append(("begin", title, total))

    def progress_update(self, step, total, text):
        self.calls.append(("update", step, total, text))
        if self.on_progress and f"step {step}/" in text:  # not a counted stage before training (class images)
            self.on_progress(step)

    def progress_end(self):
        self.calls.append(("end",))

    def run_exclusive(self, fn):
        self.calls.append(("exclusive",))
        return fn()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from dreambooth_ext.tiny import write_tiny_checkpoint

    h = FakeHost(tmp_path_factory.mktemp("models"))
    write_tiny_checkpoint("sd1", h.checkpoint_dir() / "tiny-sd1.safetensors")
    h.active = str(h.checkpoint_dir() / "tiny-sd1.safetensors")
    return h


def odd_config() -> TrainConfig:
    """A config whose every setting differs from its default, with more concepts than boxes."""
    concepts = [Concept(instance_dir=f"/data/c{i}", instance_prompt=f"a photo of sks{i} dog",
                        caption_mode="filewords", instance_token=f"sks{i}", class_prompt="a photo of a dog",
                        class_dir=f"/data/class{i}", num_class_images=7 + i, class_steps=5 + i, class_guidance=3.5,
                        class_negative_prompt="bad", concept_sample_prompts=[f"sks{i} at sea", "x"])
                for i in range(F.CONCEPT_BOXES + 2)]
    return TrainConfig(
        checkpoint="/m/base.safetensors", name="odd", workspace_dir="/w", family="sd2", concepts=concepts,
        class_image_steps=11, class_image_guidance=5.5, class_image_batch_size=2, class_image_negative_prompt="blurry",
        class_image_generator="webui",
        train_mode="lora", resolution=768, max_steps=1234, train_batch_size=2, gradient_accumulation_steps=3,
        seed=99, prior_loss_weight=0.5, min_snr_gamma=5.0, offset_noise=0.05, bucketing=False, bucket_step=32,
        bucket_upscale=True, center_crop=False, hflip=True, use_ema=True, ema_decay=0.999,
        optimizer="adafactor", learning_rate=3e-6, lora_learning_rate=2e-4, adam_beta1=0.8, adam_beta2=0.99,
        adam_epsilon=1e-7, weight_decay=0.0, max_grad_norm=0.5, lr_scheduler="cosine", lr_warmup_steps=10,
        lr_num_cycles=2, lr_power=2.0, lora_rank=8, lora_alpha=4.0, lora_targets="attention_ff",
        init_lora="/l/start.safetensors", text_encoder_mode="lora", text_encoder_lr=2e-6,
        text_encoder_lora_lr=1e-5, text_encoder_stop_step=100, max_prompt_tokens=150, clip_skip=2,
        prompt_weighting=True,
        mixed_precision="bf16", attention="sdpa",
        gradient_checkpointing=True, fused_backward_pass=True, cache_latents=False, cache_text_embeddings=False,
        sample_every=50, sample_prompts=["a sks0 dog on a beach", "a sks1 dog, oil painting"],
        sample_negative_prompt="ugly", sample_seeds=[1, 2, 3], num_sample_images=3, sample_steps=12,
        sample_guidance=6.0, save_model_every=500, save_state_every=250, save_format="ckpt", save_dtype="bf16",
        save_lora_merged=True, shuffle_tags=True, keep_tokens=2, caption_dropout=0.1, save_model_on_interrupt=True,
        keep_last_models=3, max_epochs=4, monitor_clip_model="/m/clip")


def _form_settings():
    """Every form value's key and setting, in the order the tab should lay them out."""
    keys = [(s.name, s) for s in F.top_settings()]
    for i in range(1, F.CONCEPT_BOXES + 1):
        keys += [(F.concept_key(i, s.name), s) for s in F.concept_settings()]
    return keys


def _form_to_config(form, extra_concepts=()):
    """Form values as the TrainConfig a job would get (UserError naming a mistyped setting)."""
    return load_config(F.form_to_dict(form, extra_concepts))


def test_odd_config_changes_every_setting():
    cfg, default = to_dict(odd_config()), to_dict(TrainConfig())
    same = [k for k in default if k not in F.HOST_SETTINGS and cfg[k] == default[k]]
    assert same == [], "extend odd_config() so the round trip covers these settings"


def test_tab_builds_with_a_widget_per_setting(host):
    tab = Tab(host)
    blocks = tab.build()
    assert isinstance(blocks, gr.Blocks)
    assert [k for k, _ in _form_settings()] == sorted(tab.form.keys, key=[k for k, _ in _form_settings()].index)
    assert set(tab.form.keys) == {k for k, _ in _form_settings()}
    for key, component in tab.form.components.items():
        if key != "checkpoint":
            assert isinstance(component, WIDGETS[F.widget_kind(tab.form.settings[key])]), key
        assert component.elem_id.startswith("dreambooth_"), key
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for needed in ("train", "interrupt", "resume", "status", "poll", "loss_plot", "samples", "outputs", "activate",
                   "save", "load", "config_path", "recommend", "refresh", "checkpoint", "concept4_instance_dir"):
        assert "dreambooth_" + needed in ids, needed
    assert tab.checkpoint.value == "tiny-sd1.safetensors"  # the host's active checkpoint
    assert tab.checkpoint.choices and "tiny-sd1.safetensors" in str(tab.checkpoint.choices)
    assert isinstance(build_tab(host), gr.Blocks)


def test_widget_kinds_follow_describe():
    kinds = {s.name: F.widget_kind(s) for s in describe(TrainConfig)}
    assert kinds["bucketing"] == "checkbox" and kinds["optimizer"] == "dropdown"
    assert kinds["resolution"] == "slider" and kinds["max_steps"] == "number" and kinds["seed"] == "number"
    assert kinds["learning_rate"] == "number" and kinds["sample_prompts"] == "lines" and kinds["sample_seeds"] == "csv"
    assert F.label_for("lora_learning_rate") == "LoRA learning rate"


def test_form_round_trips_a_config():
    cfg = odd_config()
    form, extras = F.config_to_form(cfg)
    assert len(extras) == 2 and form["concept4.instance_dir"] == "/data/c3"
    assert form["sample_prompts"] == "a sks0 dog on a beach\na sks1 dog, oil painting"
    assert form["sample_seeds"] == "1, 2, 3"
    back = _form_to_config(form, extras)
    assert to_dict(back) == to_dict(cfg)
    assert F.config_to_form(back) == (form, extras)  # values -> config -> values


def test_form_reads_widget_values_as_typed_in():
    form = F.default_form()
    form.update({"max_steps": 40.0, "resolution": 128.0, "sample_seeds": "5,6  7", "sample_prompts": "\n a \n\n b\n",
                 "concept2.instance_dir": "/x", "concept2.instance_prompt": "a sks thing"})
    cfg = _form_to_config(form)
    assert cfg.max_steps == 40 and cfg.resolution == 128 and cfg.sample_seeds == [5, 6, 7]
    assert cfg.sample_prompts == ["a", "b"]
    assert [c.instance_dir for c in cfg.concepts] == ["/x"]  # empty boxes are left out
    form["max_steps"] = "many"
    with pytest.raises(Exception, match="max_steps"):
        _form_to_config(form)


def test_save_and_load_config(host):
    h = Handlers(host, JobRunner())
    form, extras = h.form_of(odd_config())
    folder = host.models_dir() / "configs"  # settings files live inside the host's folders
    reply, path = h.save(form, extras, str(folder / "cfg.json"))
    assert reply.ok and Path(path).is_file()
    saved = json.loads(Path(path).read_text())
    assert saved["models_dir"] == str(host.models_dir())  # the host's folders, whatever the form held
    if "checkpoint_dir" in saved:
        assert saved["checkpoint_dir"] == str(host.checkpoint_dir()) and saved["lora_dir"] == str(host.lora_dir())
    loaded, loaded_extras, reply = h.load(path)
    assert reply.ok and loaded == form and loaded_extras == extras and "2 more concepts" in reply.text

    reply, path = h.save(form, extras, "")  # empty: the run's workspace
    assert reply.ok and path == str(host.models_dir() / "dreambooth" / "odd" / "config.json")
    for bad in ("", str(folder / "missing.json")):
        assert h.load(bad)[0] is None and not h.load(bad)[2].ok
    (folder / "broken.json").write_text("{nope")
    loaded, _, reply = h.load(str(folder / "broken.json"))
    assert loaded is None and "not valid JSON" in reply.text


def test_recommended_fills_valid_values(host):
    from dreambooth_ext.train.memory import estimate_for_config
    from dreambooth_ext.train.recommend import fits

    h = Handlers(host, JobRunner())
    form = h.initial_form()
    form.update({"name": "rec", "concept1.instance_dir": str(DEMO), "concept1.instance_prompt": "a sks_pixarstyle toy"})
    for family in ("sd1", "sd2-v", "sdxl"):
        for mode in ("full", "lora"):
            for vram in (6, 12, 24, 80, None):
                filled, reply = h.recommend(form, family, mode, vram)
                assert reply.ok, reply.text
                validate(h.config(filled))
    filled, reply = h.recommend(form, "sd1", "full", 4)  # 5 GB and up fit Adafactor with the fused pass
    assert filled["train_mode"] == "lora" and "switched to LoRA" in reply.text
    assert fits(estimate_for_config(h.config(filled), family="sd1").upper_gb, 8)  # chosen by the memory estimate
    assert not h.recommend(form, "sd9", "full", 8)[1].ok


def test_status_text_and_plot():
    from dreambooth_ext.jobs import JobState

    s = JobState(name="x", status="running", stage="training on cpu", step=12, total=40, loss=0.5454, eta_seconds=67)
    assert status_text(s) == "running · training on cpu · step 12/40 · loss 0.5454 · ETA 1:07"
    img = loss_plot([[1, 2.0], [2, 1.5], [3, 1.7], [4, 0.9]])
    assert img.size == (560, 220) and len(set(img.getdata())) > 3  # something is drawn
    assert loss_plot([]).size == (560, 220)


class FakeJob:
    """Stands in for a running job: the handlers read only its snapshot."""

    def __init__(self, state):
        self.state = state
        self.done = False

    def snapshot(self):
        return self.state


def test_the_monitor_curves_and_closing_note_through_the_handlers(host):
    from dreambooth_ext.jobs import JobState
    from dreambooth_ext.train.monitor import Point
    from dreambooth_ext.ui.render import monitor_html, monitor_image

    runner = JobRunner()
    h = Handlers(host, runner)
    tab = Tab(host, h)
    tab.build()
    assert "measures at each sample step" in tab.monitor_note.value
    state = JobState(name="mon", status="running", step=20, total=60, losses=[[1, 0.5], [20, 0.4]],
                     monitor=[Point(20, 0.9, 0.1, 9.0, 1.0)])
    runner.current = FakeJob(state)
    view = h.poll()
    assert [p.step for p in view.monitor] == [20] and not view.monitor_note
    assert "monitor at step 20: fidelity 0.90" in monitor_html(view)
    polled = tab._poll("", "tiny-sd1.safetensors")
    assert polled[7].size == (560, 220) and "monitor at step 20" in polled[8]  # a plot beside the loss
    assert tab._poll(polled[-1], "tiny-sd1.safetensors")[7] == gr.update()  # nothing new: not sent again
    state.monitor = state.monitor + [Point(40, 0.6, 0.3, 6.0, 3.0), Point(60, 0.4, 0.7, 4.0, 7.0)]
    state.monitor_note, state.status = "monitor: best step 40 (closest to the instance images ...)", "finished"
    again = tab._poll(polled[-1], "tiny-sd1.safetensors")
    assert again[-1] != polled[-1] and "best step 40" in again[8]  # the closing note replaces the figures
    drawn = again[7]
    assert drawn.size == (560, 220) and len(set(drawn.getdata())) > 5
    assert drawn.getpixel((52, 12)) != (255, 255, 255)  # the frame
    # the best step (40: step 60 drifted past the limit) is marked in green, half way along the step axis
    x = 52 + (40 - 20) / (60 - 20) * (560 - 12 - 52)
    column = [drawn.getpixel((int(x), y)) for y in range(20, 190)]
    assert sum(1 for c in column if c[1] > c[0] + 60 and c[1] > c[2] + 60) > 100, "no best-step line"
    clip = Point(20, 0.9, 0.1, 9.0, 1.0, clip_i=0.6, clip_t=0.2, class_clip_i=0.95)
    assert monitor_image(view.__class__(key="", running=False, status="", monitor=[clip])).size == (560, 400)


def _wait(runner, seconds=150):
    job = runner.current
    assert job.wait(seconds), job.snapshot()  # the job's end event, not a polling loop
    return job.snapshot()


def test_train_interrupt_resume_through_the_handlers(host):
    runner = JobRunner()
    h = Handlers(host, runner)
    tab = Tab(host, h)
    tab.build()
    form = h.initial_form()
    form.update({"name": "tabtest", "concept1.instance_dir": str(DEMO),
                 "concept1.instance_prompt": "a sks_pixarstyle character",
                 "concept1.class_prompt": "a pixar-style character", "concept1.num_class_images": 2,
                 "class_image_steps": 2, "resolution": 64, "max_steps": 8, "learning_rate": 1e-3,
                 "sample_every": 4, "sample_steps": 2, "num_sample_images": 1})
    interrupts = []

    def interrupt_at_3(step):
        if step >= 3 and not interrupts:
            interrupts.append(h.interrupt())

    refused = h.train({**form, "name": ""})  # checked before any job starts
    assert not refused.ok and "'name' is empty" in refused.text and runner.current is None
    host.on_progress = interrupt_at_3
    reply = h.train(form)
    assert reply.ok, reply.text
    busy = h.train(form)  # the first job is still loading its model
    assert not busy.ok and "is training now" in busy.text
    state = _wait(runner)
    assert state.status == "cancelled" and state.step == 3, state
    assert interrupts[0].ok and "Resume" in interrupts[0].text
    assert ("exclusive",) in host.calls and ("begin", "tabtest", 8) in host.calls
    assert ("end",) in host.calls
    steps = [c[1] for c in host.calls if c[0] == "update" and f"step {c[1]}/" in c[3]]
    assert steps and steps == sorted(steps) and max(steps) == 3

    host.on_progress = None
    host.calls.clear()
    reply = h.train(form, resume=True)
    assert reply.ok and "from its saved step 3" in reply.text, reply.text
    state = _wait(runner)
    assert state.status == "finished" and state.step == 8, state
    written = host.checkpoint_dir() / "tabtest_8.safetensors"
    assert written.is_file() and str(written) in state.outputs
    assert ("refresh",) in host.calls and "tabtest_8.safetensors" in h.checkpoint_titles()
    assert state.samples and all(Path(p).is_file() for p in state.samples)

    view = h.poll()
    assert view.finished and not view.running and view.samples[0][1].startswith("step 8")
    assert [p.step for p in view.monitor] == [4, 8] and view.monitor_note.startswith("monitor: ")  # the monitor ran
    polled = tab._poll("", "tiny-sd1.safetensors")
    assert "finished" in polled[0] and "tabtest_8.safetensors" in str(polled[5])  # the refreshed dropdown
    assert polled[5]["value"] == "tiny-sd1.safetensors"
    assert tab._poll(polled[-1], "tiny-sd1.safetensors")[1] == gr.update()  # nothing new: the plot is not sent again
    reply = h.activate()
    assert reply.ok and host.active == str(written)
    assert not h.interrupt().ok  # nothing runs now


def test_memory_estimate_beside_train_follows_the_settings(host):
    tab = Tab(host)
    tab.build()
    assert "estimated ~" in tab.memory.value and "GB peak GPU memory" in tab.memory.value
    form = dict(tab.start, train_mode="full", optimizer="adamw", gradient_checkpointing=False)
    full = tab._memory(*tab.form.to_values(form))
    lora = tab._memory(*tab.form.to_values(dict(form, train_mode="lora")))
    gb = lambda line: float(line.split("~")[1].split(" GB")[0])  # noqa: E731
    assert gb(full) > gb(lora)
