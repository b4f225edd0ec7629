"""Print the README's table of settings from the typed config: `python tools/settings_table.py`.

One table per group, in the tab's order, with each setting's label in the tab, its JSON/CLI name,
default, range or choices and help text, all from `describe()`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_ext.train.config import GROUPS, Concept, TrainConfig, describe  # noqa: E402
from dreambooth_ext.ui.form import HOST_SETTINGS, label_for  # noqa: E402


def _default(s) -> str:
    if s.default in ("", []):
        return "(empty)"
    return f"`{s.default}`"


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _allowed(s) -> str:
    if s.choices:
        return ", ".join(f"`{c}`" for c in s.choices)
    if s.min is not None and s.max is not None:
        step = f", multiple of {s.multiple_of}" if s.multiple_of else ""
        return f"{_number(s.min)} to {_number(s.max)}{step}"
    return {"bool": "on/off", "list[str]": "one per line", "list[int]": "comma-separated"}.get(s.kind, "text")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")  # NAME_<step> is no HTML tag


def table() -> str:
    settings = [(s, "concept box") for s in describe(Concept)]
    settings += [(s, "set by the host, not in the tab" if s.name in HOST_SETTINGS else "")
                 for s in describe(TrainConfig) if s.name != "concepts"]
    out = []
    for group in GROUPS:
        rows = [(s, where) for s, where in settings if s.group == group]
        if not rows:
            continue
        out += [f"#### {label_for(group)}", "", "| Setting | Name | Default | Allowed | What it does |",
                "| --- | --- | --- | --- | --- |"]
        for s, where in rows:
            name = f"`{s.name}`" + (f" ({where})" if where else "")
            out.append(f"| {label_for(s.name)} | {name} | {_default(s)} | {_allowed(s)} | {_cell(s.help)} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(table())
