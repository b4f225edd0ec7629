"""`./run.sh ui`: the DreamBooth tab as a page of its own, without the WebUI.

The page renders the same Blocks the WebUI would, the way the WebUI does (`render()` inside its
own Blocks), and adds what the WebUI otherwise brings: the extension's style.css and
javascript/*.js.
"""

import os
from pathlib import Path
from typing import Optional

EXTENSION_ROOT = Path(__file__).resolve().parents[2]
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


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


def serve(models_dir: str = "models", host: str = "127.0.0.1", port: int = 7870,
          block: bool = True, offer_tiny: bool = True) -> Optional[object]:
    """Serve the page on host:port; returns the page when block=False (tests stop it with close())."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    from dreambooth_ext.host.standalone import StandaloneHost

    # served beyond this machine: runs keep to the models folder, as in a WebUI started with --listen
    web_host = StandaloneHost(models_dir, offer_tiny=offer_tiny, non_local=host not in LOCAL_ADDRESSES)
    page = build_page(web_host)
    print(f"DreamBooth: serving http://{host}:{port} (models folder {web_host.models_dir()})", flush=True)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, inbrowser=False,
                show_api=False, allowed_paths=[str(web_host.models_dir())])
    return page
