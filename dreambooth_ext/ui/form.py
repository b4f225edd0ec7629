"""The training settings as form fields: which widget shows each one, and its value both ways.

Everything comes from `describe()`, so a setting added to TrainConfig appears in the tab by
itself, with its default, range and help. A form's values travel as a flat dict keyed by
setting name, concept settings as `concept<N>.<name>` (N = 1..CONCEPT_BOXES). The conversions
are plain functions; only `Form` and `make_component` touch gradio.
"""

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dreambooth_ext.folders import HOST_FOLDERS
from dreambooth_ext.train.config import Concept, SettingInfo, TrainConfig, describe
from dreambooth_ext.train.config_io import to_dict

CONCEPT_BOXES = 4
# where models go is the host's to say (its folders, --ckpt-dir, --lora-dir), not the form's
HOST_SETTINGS = HOST_FOLDERS
# concepts have their own boxes
NOT_IN_FORM = {"concepts", *HOST_SETTINGS}
# ranges wider than this are typed, not dragged (steps up to a million, seeds up to 2^32)
SLIDER_SPAN = 4096

# where a setting's name alone would read oddly in the tab
_LABELS = {"checkpoint": "Source checkpoint", "name": "New model name"}
_WORDS = {"lr": "LR", "lora": "LoRA", "ema": "EMA", "snr": "SNR", "cfg": "CFG", "te": "TE", "dir": "folder",
          "num": "number of", "adam": "Adam", "8bit": "8-bit"}


def label_for(name: str) -> str:
    """'lora_learning_rate' -> 'LoRA learning rate'."""
    if name in _LABELS:
        return _LABELS[name]
    words = [_WORDS.get(w, w) for w in name.split("_")]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def concept_key(index: int, name: str) -> str:
    return f"concept{index}.{name}"


def top_settings() -> List[SettingInfo]:
    return [s for s in describe(TrainConfig) if s.name not in NOT_IN_FORM]


def concept_settings() -> List[SettingInfo]:
    return describe(Concept)


def widget_kind(info: SettingInfo) -> str:
    """checkbox | dropdown | slider | number | text | lines | csv."""
    if info.kind == "bool":
        return "checkbox"
    if info.choices:
        return "dropdown"
    if info.kind == "int":
        bounded = info.min is not None and info.max is not None
        return "slider" if bounded and info.max - info.min <= SLIDER_SPAN else "number"
    if info.kind == "float":
        return "number"  # a slider would round 1e-8 or 0.9999 to its step
    if info.kind == "list[str]":
        return "lines"
    if info.kind == "list[int]":
        return "csv"
    return "text"


def to_widget(info: SettingInfo, value: Any) -> Any:
    """A config value as its widget shows it."""
    kind = widget_kind(info)
    if kind == "lines":
        return "\n".join(value or [])
    if kind == "csv":
        return ", ".join(str(v) for v in value or [])
    return value


def from_widget(info: SettingInfo, value: Any) -> Any:
    """A widget's value as load_config takes it (it coerces types and words the errors)."""
    kind = widget_kind(info)
    if kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if kind == "csv":
        return [part for part in re.split(r"[,\s]+", str(value or "")) if part]
    if kind == "text":
        return "" if value is None else value
    if kind in ("number", "slider") and info.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # sliders hand back floats
    return value


def default_form() -> Dict[str, Any]:
    form, _ = config_to_form(TrainConfig())
    return form


def config_to_form(cfg: TrainConfig) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(form values, concepts beyond the boxes, kept as dicts so a loaded config loses nothing)."""
    data = to_dict(cfg)
    form = {s.name: to_widget(s, data[s.name]) for s in top_settings()}
    concepts = data["concepts"]
    for i in range(1, CONCEPT_BOXES + 1):
        values = concepts[i - 1] if i <= len(concepts) else to_dict_concept(Concept())
        for s in concept_settings():
            form[concept_key(i, s.name)] = to_widget(s, values[s.name])
    return form, [dict(c) for c in concepts[CONCEPT_BOXES:]]


def to_dict_concept(concept: Concept) -> Dict[str, Any]:
    return {s.name: getattr(concept, s.name) for s in concept_settings()}


def _box_is_empty(form: Dict[str, Any], index: int) -> bool:
    blank = to_dict_concept(Concept())
    return all(from_widget(s, form.get(concept_key(index, s.name))) == blank[s.name] for s in concept_settings()
               if s.kind in ("str", "list[str]"))


def form_to_dict(form: Dict[str, Any], extra_concepts: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """Form values as a config dict; a concept box whose text fields are all empty is left out."""
    data = {s.name: from_widget(s, form[s.name]) for s in top_settings() if s.name in form}
    concepts = []
    for i in range(1, CONCEPT_BOXES + 1):
        if not _box_is_empty(form, i):
            concepts.append({s.name: from_widget(s, form[concept_key(i, s.name)]) for s in concept_settings()})
    data["concepts"] = concepts + [dict(c) for c in extra_concepts]
    return data


# ---------------------------------------------------------------------------------------------
# gradio components


def make_component(info: SettingInfo, elem_id: str, value: Any = None, label: Optional[str] = None):
    """The widget for one setting; its value starts at `value` (widget form) or the default."""
    import gradio as gr

    kind = widget_kind(info)
    start = to_widget(info, info.default) if value is None else value
    common = {"label": label or label_for(info.name), "info": info.help, "elem_id": elem_id}
    if kind == "checkbox":
        return gr.Checkbox(value=bool(start), **common)
    if kind == "dropdown":
        return gr.Dropdown(choices=list(info.choices), value=start, **common)
    if kind == "slider":
        return gr.Slider(minimum=info.min, maximum=info.max, step=info.multiple_of or 1, value=start, **common)
    if kind == "number":
        return gr.Number(value=start, precision=0 if info.kind == "int" else None, **common)
    if kind == "lines":
        return gr.Textbox(value=start, lines=3, placeholder="one per line", **common)
    if kind == "csv":
        return gr.Textbox(value=start, lines=1, placeholder="comma-separated, e.g. 1, 2, 3", **common)
    return gr.Textbox(value=start, lines=1, **common)


class Form:
    """The components of the form, keyed like the form dict; turns gradio's value lists into dicts and back."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.components: Dict[str, Any] = {}
        self.settings: Dict[str, SettingInfo] = {}

    def elem_id(self, key: str) -> str:
        return self.prefix + key.replace(".", "_")

    def add(self, key: str, info: SettingInfo, component=None, value: Any = None, label: Optional[str] = None):
        """Register `component` for `key`, or build the default widget for `info`."""
        if component is None:
            component = make_component(info, self.elem_id(key), value, label)
        self.components[key] = component
        self.settings[key] = info
        return component

    @property
    def keys(self) -> List[str]:
        return list(self.components)

    @property
    def inputs(self) -> List[Any]:
        return list(self.components.values())

    def to_dict(self, values: Sequence[Any]) -> Dict[str, Any]:
        return dict(zip(self.keys, values))

    def to_values(self, form: Dict[str, Any]) -> List[Any]:
        return [form[k] for k in self.keys]
