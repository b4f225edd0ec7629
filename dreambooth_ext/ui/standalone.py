"""`./run.sh ui`: the DreamBooth tab as a page of its own, without the WebUI.

The page renders the same Blocks the WebUI would, the way the WebUI does (`render()` inside its
own Blocks), and adds what the WebUI otherwise brings: the extension's style.css and
javascript/*.js. The host it is built for comes from its caller (`host/standalone.py` serves it).
"""

from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parents[2]


def page_css() -> str:
    path = EXTENSION_ROOT / "style.css"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def page_js() -> str:
    """The extension's scripts as one function body, run once the page has loaded."""
    scripts = sorted((EXTENSION_ROOT / "javascript").glob("*.js"))
    body = "\n".join(p.read_text(encoding="utf-8") for p in scripts)
    return "() => {\n" + body + "\n}"


def build_page(host):
    import gradio as gr

    from dreambooth_ext.ui import compat
    from dreambooth_ext.ui.tab import build_tab

    # plain font names: a Google font would be fetched from the network at every page load
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "Consolas", "monospace"])
    tab = build_tab(host)
    with gr.Blocks(title="DreamBooth", css=page_css(), theme=theme, analytics_enabled=False) as page:
        gr.Markdown("## DreamBooth\nTeach a checkpoint a subject or style. Models folder: "
                    f"`{host.models_dir()}` (the built-in `tiny-sd1` model trains on a CPU in a minute).")
        tab.render()
        compat.run_on_load(page, page_js())
    return compat.enable_queue(page)

