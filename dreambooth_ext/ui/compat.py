"""The few places where gradio 3.41 (A1111, SD.Next) and gradio 4.x (Forge) differ, behind one name each."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js_kwarg(js: Optional[str]) -> Dict[str, str]:
    """gradio 3 names an event's browser-side function `_js`, gradio 4 `js`."""
    if not js:
        return {}
    return {"js": js} if GRADIO_MAJOR >= 4 else {"_js": js}


def listen(event: Callable, fn: Optional[Callable], inputs: Sequence = (), outputs: Sequence = (),
           js: Optional[str] = None, quiet: bool = False):
    """Wire `event` (e.g. button.click) the same way under both versions.

    `quiet` hides gradio's loading overlay: polled updates would otherwise flicker every second.
    """
    return event(fn, inputs=list(inputs), outputs=list(outputs), show_progress="hidden" if quiet else "full",
                 **js_kwarg(js))


def update(**changes: Any) -> Dict[str, Any]:
    """A partial update of a component; gr.update exists in both (gradio 4 also accepts constructors)."""
    return gr.update(**changes)


def unchanged() -> Dict[str, Any]:
    return gr.update()


def gallery_value(items: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """(image path, caption) pairs: the one Gallery value format both versions accept."""
    return [(str(path), caption) for path, caption in items]


def run_on_load(page: "gr.Blocks", js: str) -> None:
    """Run browser code once the page is up (a standalone page has no WebUI to load javascript/*.js)."""
    if GRADIO_MAJOR >= 4:
        page.load(None, None, None, js=js)
    else:
        page.load(None, None, None, _js=js)


def enable_queue(page: "gr.Blocks") -> "gr.Blocks":
    """gradio 3 runs one queued event at a time by default; let polls pass a slow Save or Load."""
    if GRADIO_MAJOR >= 4:
        return page.queue(default_concurrency_limit=4)
    return page.queue(concurrency_count=4)
