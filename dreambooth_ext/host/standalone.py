"""The host of the standalone page (`./run.sh ui`): a local models folder and no WebUI around it.

A tiny random-weight SD1 model is written into the checkpoint folder on first use, so someone
without a GPU or a real checkpoint can try a whole training run on a CPU in a minute. `serve` builds
the page (ui/standalone.py) for this host and serves it, as the WebUI does for its own host.
"""

import logging
import os
import threading
from pathlib import Path
from typing import List, Optional, Tuple, Union

from dreambooth_ext.bridge import is_checkpoint_name
from dreambooth_ext.hostapi import Host

log = logging.getLogger("dreambooth_ext.standalone")

TINY_NAME = "tiny-sd1.safetensors"
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


class StandaloneHost(Host):
    name = "standalone"

    def __init__(self, models_dir: Union[str, Path] = "models", offer_tiny: bool = True, non_local: bool = False):
        self._models = Path(models_dir).resolve()
        self._non_local = non_local
        self._offer_tiny = offer_tiny
        self._active: Optional[str] = None
        self._tiny_lock = threading.Lock()

    def models_dir(self) -> Path:
        return self._models

    def non_local(self) -> bool:
        return self._non_local

    def tiny_checkpoint(self) -> Path:
        """The built-in tiny model, written (about 2 s) the first time it is asked for."""
        path = self.checkpoint_dir() / TINY_NAME
        with self._tiny_lock:
            if not path.is_file():
                from dreambooth_ext.tiny import write_tiny_checkpoint

                log.info(f"writing the built-in tiny model to {path}")
                write_tiny_checkpoint("sd1", path)
        return path

    def list_checkpoints(self) -> List[Tuple[str, str]]:
        """Every checkpoint under models/Stable-diffusion, titled by its path relative to that folder."""
        if self._offer_tiny:
            self.tiny_checkpoint()
        root = self.checkpoint_dir()
        found = {p for p in root.rglob("*") if is_checkpoint_name(p.name)} if root.is_dir() else set()
        return [(p.relative_to(root).as_posix(), str(p)) for p in sorted(found)]

    def active_checkpoint(self) -> Optional[str]:
        if self._active:
            return self._active
        return str(self.tiny_checkpoint()) if self._offer_tiny else None

    def set_active_checkpoint(self, path: str) -> bool:
        """There is no generation here: the checkpoint becomes the page's default source model."""
        if not Path(path).is_file():
            return False
        self._active = str(Path(path).resolve())
        return True

    def progress_begin(self, title: str, total: int) -> None:
        log.info(f"{title}: {total} steps")

    def progress_end(self) -> None:
        log.info("training ended")


def serve(models_dir: str = "models", host: str = "127.0.0.1", port: int = 7870,
          block: bool = True, offer_tiny: bool = True) -> Optional[object]:
    """Serve the page on host:port; returns the page when block=False (tests stop it with close())."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    from dreambooth_ext.ui.standalone import build_page

    # served beyond this machine: runs keep to the models folder, as in a WebUI started with --listen
    web_host = StandaloneHost(models_dir, offer_tiny=offer_tiny, non_local=host not in LOCAL_ADDRESSES)
    page = build_page(web_host)
    print(f"DreamBooth: serving http://{host}:{port} (models folder {web_host.models_dir()})", flush=True)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, inbrowser=False,
                show_api=False, allowed_paths=[str(web_host.models_dir())])
    return page
