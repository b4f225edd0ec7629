"""The DreamBooth tab: gradio Blocks wired to `Handlers`; the same code in the WebUI and on the standalone page.

The page's state comes from the job runner on the server: javascript/dreambooth.js polls once as the page
opens, so a reloaded page or a second browser window shows the running job and the queue again.
Polling: javascript/dreambooth.js clicks the hidden `dreambooth_poll` button every second
while the status line says a job runs (the WebUI's own convention; it works the same under
gradio 3 and 4 and inside the WebUI, where a nested Blocks cannot own a timer).
"""

from typing import Any, Dict, List, Optional

import gradio as gr

from dreambooth_ext.hostapi import Host
from dreambooth_ext.plot import loss_plot
from dreambooth_ext.train.config import FAMILIES, GROUPS
from dreambooth_ext.train.memory import MEMORY_CONCEPT_SETTINGS, MEMORY_SETTINGS, form_memory_note
from dreambooth_ext.ui import compat
from dreambooth_ext.ui.form import CONCEPT_BOXES, Form, concept_key, concept_settings, label_for, top_settings
from dreambooth_ext.ui.handlers import Handlers, View
from dreambooth_ext.ui.render import monitor_html, monitor_image, outputs_html, reply_html, view_html

PREFIX = "dreambooth_"
OPEN_GROUPS = {"training"}


# what the steps-per-epoch line beside Train follows, besides the memory settings
EPOCH_SETTINGS = ("max_steps", "max_epochs", "gradient_accumulation_steps", "bucketing", "concept1.instance_dir")


def gpu_memory_gb() -> Optional[float]:
    """The first CUDA device's memory, for the recommendations; None without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception:  # a broken driver must not break the tab
        pass
    return None


def not_a_default(component):
    """Keep a component out of the WebUI's ui-config.json (modules/ui_loadsave.py reads this attribute).

    The WebUI saves each labelled component's first value and restores it at every start: that would
    pin the source checkpoint to the one active at the first start, and the GPU memory to one machine.
    """
    component.do_not_save_to_config = True
    return component


class Tab:
    """Builds the components, then wires them; `form` maps setting keys to components."""

    def __init__(self, host: Host, handlers: Optional[Handlers] = None):
        self.host = host
        self.h = handlers or Handlers(host)
        self.form = Form(PREFIX)
        self.start = self.h.initial_form()

    # --- layout
    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False) as blocks:
            self.extras = gr.State([])  # concepts of a loaded config beyond the four boxes
            self.seen = gr.State("")  # the last poll's key, per browser tab
            with gr.Row(elem_id=PREFIX + "main"):
                with gr.Column(scale=3):
                    self._model()
                    self._concepts()
                    for group in GROUPS[1:]:  # the model group is laid out by _model
                        self._group(group)
                with gr.Column(scale=2):
                    self._controls()
                    self._results()
                    self._settings_tools()
            self._wire()
        return blocks

    def _field(self, key: str):
        info = {s.name: s for s in top_settings()}[key]
        return self.form.add(key, info, value=self.start[key])

    def _model(self):
        info = {s.name: s for s in top_settings()}
        with gr.Row(elem_id=PREFIX + "model"):
            self.checkpoint = gr.Dropdown(
                choices=self.h.checkpoint_titles(), value=self.start["checkpoint"], allow_custom_value=True,
                label=label_for("checkpoint"), info=info["checkpoint"].help, elem_id=PREFIX + "checkpoint", scale=8)
            self.refresh = gr.Button("\u21bb", elem_id=PREFIX + "refresh", elem_classes=["tool"], scale=0,
                                     min_width=40)
            self.form.add("checkpoint", info["checkpoint"], component=not_a_default(self.checkpoint))
        with gr.Row():
            for s in top_settings():
                if s.group == "model" and s.name not in self.form.components:
                    self._field(s.name)

    def _concepts(self):
        with gr.Tabs(elem_id=PREFIX + "concepts"):
            for i in range(1, CONCEPT_BOXES + 1):
                with gr.Tab(f"Concept {i}", elem_id=f"{PREFIX}concept{i}"):
                    for info in concept_settings():
                        key = f"concept{i}.{info.name}"
                        # the four boxes share labels, so they would share one saved WebUI default
                        not_a_default(self.form.add(key, info, value=self.start[key]))

    def _group(self, group: str):
        names = [s.name for s in top_settings() if s.group == group and s.name not in self.form.components]
        if not names:
            return
        elem_id = PREFIX + "group_" + group.replace(" & ", "_").replace(" ", "_")
        with gr.Accordion(label_for(group), open=group in OPEN_GROUPS, elem_id=elem_id):
            for name in names:
                self._field(name)

    def _controls(self):
        with gr.Row():
            self.train = gr.Button("Train", variant="primary", elem_id=PREFIX + "train")
            self.interrupt = gr.Button("Interrupt", elem_id=PREFIX + "interrupt")
            self.resume = gr.Button("Resume", elem_id=PREFIX + "resume")
        self.memory = gr.HTML(self._memory(*self.form.to_values(self.start)), elem_id=PREFIX + "memory")
        self.message = gr.HTML("", elem_id=PREFIX + "message")
        self.status = gr.HTML(view_html(self.h.poll()), elem_id=PREFIX + "status")
        with gr.Row(elem_id=PREFIX + "queue_row"):  # jobs started while another runs wait here
            self.queued = not_a_default(gr.Dropdown(
                choices=self.h.queued_names(), value=None, label="Waiting job", scale=4,
                info="Train while a job runs puts the new job in the queue; it can be removed before it starts.",
                elem_id=PREFIX + "queued"))
            self.remove = gr.Button("Remove from queue", elem_id=PREFIX + "remove_queued", scale=1)
        # clicked by javascript/dreambooth.js; style.css hides it (a gradio 4 invisible button has no element)
        self.poll = gr.Button("poll", elem_id=PREFIX + "poll", elem_classes=["dreambooth-hidden"])

    def _results(self):
        start = View(key="", running=False, status="")  # the page's first poll fills both plots
        with gr.Row(elem_id=PREFIX + "plots"):
            self.plot = gr.Image(value=loss_plot([]), type="pil", label="Loss", interactive=False,
                                 elem_id=PREFIX + "loss_plot")
            # fidelity and class drift at each sample step (train/monitor.py), with its limit and best step
            self.monitor_plot = gr.Image(value=monitor_image(start), type="pil", label="Training monitor",
                                         interactive=False, elem_id=PREFIX + "monitor_plot")
        self.monitor_note = gr.HTML(monitor_html(start), elem_id=PREFIX + "monitor_note")
        self.gallery = gr.Gallery(label="Samples", columns=4, height=300, elem_id=PREFIX + "samples")
        self.outputs = gr.HTML(outputs_html([], self.host.lora_dir()), elem_id=PREFIX + "outputs")
        self.activate = gr.Button("Make it the active checkpoint", visible=False, elem_id=PREFIX + "activate")
        # the activated checkpoint's title, handed to the WebUI's own dropdown in the browser
        self.activated = gr.Textbox(visible=False, elem_id=PREFIX + "activated")

    def _settings_tools(self):
        with gr.Accordion("Recommended settings", open=False, elem_id=PREFIX + "recommend_box"):
            with gr.Row():
                self.rec_family = gr.Dropdown(list(FAMILIES[1:]), value="sd1", label="Model family",
                                              elem_id=PREFIX + "rec_family")
                self.rec_mode = gr.Dropdown(["full", "lora"], value="lora", label="Training mode",
                                            elem_id=PREFIX + "rec_mode")
                self.rec_vram = gr.Number(value=gpu_memory_gb(), label="GPU memory (GB)",
                                          info="Empty: unknown, no memory trade-offs.", elem_id=PREFIX + "rec_vram")
                not_a_default(self.rec_vram)
            self.recommend = gr.Button("Fill in recommended settings", elem_id=PREFIX + "recommend")
        with gr.Accordion("Settings file", open=False, elem_id=PREFIX + "config_box"):
            self.config_path = gr.Textbox(label="JSON config path", elem_id=PREFIX + "config_path",
                                          placeholder="empty: MODELS/dreambooth/NAME/config.json")
            not_a_default(self.config_path)
            with gr.Row():
                self.save = gr.Button("Save settings", elem_id=PREFIX + "save")
                self.load = gr.Button("Load settings", elem_id=PREFIX + "load")

    # --- events
    def _wire(self):
        form_in = self.form.inputs
        polled = [self.status, self.plot, self.gallery, self.outputs, self.activate, self.checkpoint, self.queued,
                  self.monitor_plot, self.monitor_note, self.seen]
        compat.listen(self.refresh.click, self._refresh, [self.checkpoint], [self.checkpoint])
        compat.listen(self.save.click, self._save, form_in + [self.extras, self.config_path],
                      [self.message, self.config_path])
        compat.listen(self.load.click, self._load, [self.config_path, self.extras], form_in + [self.extras, self.message])
        compat.listen(self.recommend.click, self._recommend, form_in + [self.rec_family, self.rec_mode, self.rec_vram],
                      form_in + [self.message])
        concept_keys = [concept_key(i, name) for i in range(1, CONCEPT_BOXES + 1) for name in MEMORY_CONCEPT_SETTINGS]
        for key in [k for k in (*MEMORY_SETTINGS, *concept_keys, *EPOCH_SETTINGS) if k in self.form.components]:
            compat.listen(self.form.components[key].change, self._memory, form_in, [self.memory], quiet=True)
        compat.listen(self.train.click, self._train, form_in + [self.extras, self.seen], [self.message] + polled)
        compat.listen(self.resume.click, self._resume, form_in + [self.extras, self.seen], [self.message] + polled)
        compat.listen(self.interrupt.click, self._interrupt, [self.seen, self.checkpoint], [self.message] + polled)
        compat.listen(self.remove.click, self._remove, [self.queued, self.seen, self.checkpoint], [self.message] + polled)
        compat.listen(self.poll.click, self._page_poll, [self.seen, self.checkpoint], polled, quiet=True)
        compat.listen(self.activate.click, self._activate, [self.checkpoint],
                      [self.message, self.checkpoint, self.activated]).then(
            None, [self.activated], None, **compat.js_kwarg("dreamboothShowActive"))

    def _values(self, values) -> Dict[str, Any]:
        return self.form.to_dict(values[:len(self.form.keys)])

    def _refresh(self, current):
        titles = self.h.refresh()
        return self._choices(titles, self.h.current_title(current))

    @staticmethod
    def _choices(titles, current):
        """New choices with the value restated: gradio 4 would otherwise keep the old index, not the value."""
        return compat.update(choices=titles, value=current)

    def _save(self, *values):
        reply, path = self.h.save(self._values(values), values[-2] or [], values[-1])
        return reply_html(reply), path

    def _load(self, path, current_extras):
        form, extras, reply = self.h.load(path)
        if form is None:  # a State takes no update: hand its value back
            return [compat.unchanged() for _ in self.form.keys] + [current_extras, reply_html(reply)]
        return self.form.to_values(form) + [extras, reply_html(reply)]

    def _recommend(self, *values):
        family, mode, vram = values[-3:]
        form, reply = self.h.recommend(self._values(values), family, mode, vram)
        return self.form.to_values(form) + [reply_html(reply)]

    def _memory(self, *values):
        form = self._values(values)
        note = form_memory_note(form, self.h.checkpoint_path(form.get("checkpoint", "")), gpu_memory_gb())
        return f"{note} {self.h.epoch_note(form)}".strip()

    def _train(self, *values, resume: bool = False):
        form = self._values(values)
        reply = self.h.train(form, values[-2] or [], resume=resume)
        return [reply_html(reply)] + self._poll(values[-1], form["checkpoint"])

    def _resume(self, *values):
        return self._train(*values, resume=True)

    def _interrupt(self, seen, current):
        return [reply_html(self.h.interrupt())] + self._poll(seen, current)

    def _remove(self, name, seen, current):
        return [reply_html(self.h.remove_queued(name))] + self._poll(seen, current)

    def _activate(self, current):
        reply = self.h.activate()
        return reply_html(reply), self._choices(self.h.checkpoint_titles(), self.h.current_title(current)), \
            self.h.activated_title

    def _page_poll(self, seen, current) -> List[Any]:
        """The page's own polling; its first call (nothing seen yet) also sets the source checkpoint."""
        return self._poll(seen, current, first=not seen)

    def _poll(self, seen, current, first: bool = False) -> List[Any]:
        view = self.h.poll()
        status = view_html(view)
        if view.key == seen:
            return [status] + [compat.unchanged() for _ in range(8)] + [seen]
        waiting = compat.update(choices=view.queue, value=view.queue[0] if view.queue else None)
        return [status, loss_plot(view.losses), compat.gallery_value(view.samples),
                outputs_html(view.outputs, self.host.lora_dir()), compat.update(visible=view.finished),
                self._checkpoint_update(view, current, first), waiting, monitor_image(view), monitor_html(view),
                view.key]

    def _checkpoint_update(self, view: View, current, first: bool = False):
        """The source list as the page opens (the host's active checkpoint may have changed since the
        tab was built), and again once a job has written new files."""
        if first:
            return self._choices(self.h.checkpoint_titles(), self.h.initial_form()["checkpoint"] or current)
        if view.running or not view.outputs:
            return compat.unchanged()
        return self._choices(self.h.checkpoint_titles(), self.h.current_title(current))


def build_tab(host: Host, handlers: Optional[Handlers] = None) -> gr.Blocks:
    """The tab as a gr.Blocks, for `on_ui_tabs` or the standalone page."""
    return Tab(host, handlers).build()
