"""The tab's HTML and the monitor's plot, made from what a poll returns (handlers.View, handlers.Reply)."""

import html
from pathlib import Path
from typing import Optional, Sequence

from dreambooth_ext.paths import within
from dreambooth_ext.ui.handlers import Reply, View


def view_html(view: View) -> str:
    """The status line; its `dreambooth-running` class tells javascript/dreambooth.js to keep polling, and a new
    `data-dreambooth-written` to refresh the WebUI's own checkpoint dropdown."""
    css = "dreambooth-status-line" + (" dreambooth-running" if view.running else "")
    written = f' data-dreambooth-written="{html.escape(view.written)}"' if view.written else ""
    parts = [f'<div class="{css}"{written}>{html.escape(view.status)}</div>']
    if view.error:
        parts.append(f'<div class="dreambooth-error">{html.escape(view.error)}</div>')
    for w in view.warnings[-5:]:
        parts.append(f'<div class="dreambooth-warning">{html.escape(w)}</div>')
    if view.queue:
        items = "".join(f"<li>{html.escape(name)}</li>" for name in view.queue)
        parts.append(f'<div class="dreambooth-queue">Waiting in the queue:<ol>{items}</ol></div>')
    return "".join(parts)


def monitor_image(view: View):
    """The monitor's curves for the page: fidelity and class drift, the drift limit, the best step so far."""
    from dreambooth_ext.plot import monitor_plot
    from dreambooth_ext.train.monitor import DRIFT_LIMIT, best_of

    return monitor_plot(view.monitor, DRIFT_LIMIT, best_of(view.monitor, DRIFT_LIMIT))


def monitor_html(view: View) -> str:
    """Under the monitor's plot: its closing note (the step to take) once the run has ended, else its newest
    figures, else what it is."""
    from dreambooth_ext.train.monitor import describe

    if view.monitor_note:
        return f'<div class="dreambooth-monitor dreambooth-monitor-note">{html.escape(view.monitor_note)}</div>'
    if view.monitor:
        latest = max(view.monitor, key=lambda p: p.step)
        return f'<div class="dreambooth-monitor">{html.escape(str(describe(latest)))}</div>'
    return ('<div class="dreambooth-monitor">The training monitor measures at each sample step (Sample every): how '
            'close the instance prompt\'s pictures come to the instance images and how far the class prompt\'s '
            'drift from the base model\'s, then names the best step.</div>')


def outputs_html(paths: Sequence[str], lora_dir: Path) -> str:
    if not paths:
        return '<div class="dreambooth-outputs">No files written yet.</div>'
    items = []
    for p in paths:
        use = (f" &mdash; use it in a prompt as <code>&lt;lora:{html.escape(Path(p).stem)}:1&gt;</code>"
               if within(p, lora_dir) else "")
        items.append(f"<li><code>{html.escape(p)}</code>{use}</li>")
    return f'<ul class="dreambooth-outputs">{"".join(items)}</ul>'


def reply_html(reply: Optional[Reply]) -> str:
    if reply is None or not reply.text:
        return ""
    css = "dreambooth-message" + ("" if reply.ok else " dreambooth-error")
    return f'<div class="{css}">{html.escape(reply.text)}</div>'
