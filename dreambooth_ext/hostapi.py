"""What the tab, the API and the job runner need from a host; the WebUI adapter and the standalone host (host/) implement it."""

from pathlib import Path
from typing import Callable, List, Optional, Tuple, TypeVar

T = TypeVar("T")


class Host:
    """Defaults describe a host with no WebUI: override what the real host provides."""

    name = "standalone"

    def models_dir(self) -> Path:
        """The models folder whose Stable-diffusion/ and Lora/ the WebUI reads."""
        raise NotImplementedError

    def checkpoint_dir(self) -> Path:
        """Where new checkpoints go (the WebUI's --ckpt-dir when set)."""
        return self.models_dir() / "Stable-diffusion"

    def lora_dir(self) -> Path:
        return self.models_dir() / "Lora"

    def workspace_root(self) -> Optional[Path]:
        """Where run workspaces go when the host sets a folder for them (None: MODELS/dreambooth)."""
        return None

    def non_local(self) -> bool:
        """The page is open to other machines (the WebUI's --listen, --share): the tab then keeps every path
        of a run inside `allowed_roots`, as the API always does."""
        return False

    def allowed_roots(self) -> List[Path]:
        """The folders a config from the API, and the tab's settings files, may name."""
        root = self.workspace_root()
        return [self.models_dir(), self.checkpoint_dir(), self.lora_dir()] + ([root] if root else [])

    def list_checkpoints(self) -> List[Tuple[str, str]]:
        """(title shown in the dropdown, file path) of every checkpoint the host knows."""
        raise NotImplementedError

    def checkpoint_file(self, title: str) -> Optional[str]:
        """The file a dropdown title names, or None when it names none (then it may be a path typed in)."""
        for t, path in self.list_checkpoints():
            if t == title:
                return str(path)
        return None

    def clip_skip(self) -> Optional[int]:
        """The host's live 'Clip skip' (stop at last layers), the tab's starting clip_skip; None: no such setting."""
        return None

    def active_checkpoint(self) -> Optional[str]:
        """Path of the checkpoint the host has loaded, if any."""
        return None

    def refresh_checkpoints(self) -> None:
        """Make the host's checkpoint list see new files (waits for the host's queue lock)."""

    def refresh_checkpoints_locked(self) -> None:
        """The same, from inside `run_exclusive`, which already holds the lock."""
        self.refresh_checkpoints()

    def set_active_checkpoint(self, path: str) -> bool:
        """Load `path` as the host's active checkpoint; False where the host cannot."""
        return False

    def progress_begin(self, title: str, total: int) -> None:
        """The host's own progress bar starts (the WebUI's shared.state)."""

    def progress_update(self, step: int, total: int, text: str) -> None:
        pass

    def progress_end(self) -> None:
        pass

    def interrupted(self) -> bool:
        """The host's own Interrupt button was pressed."""
        return False

    def skipped(self) -> bool:
        """The host's own Skip button was pressed (and not yet cleared)."""
        return False

    def clear_skip(self) -> None:
        pass

    def preview(self, image_path: str) -> None:
        """Show an image (the newest sample) as the host's live preview."""

    def refusal(self, cfg) -> Optional[str]:
        """One sentence when this host cannot use what `cfg` would make, else None."""
        return None

    def cannot_make_class_images(self, cfg) -> Optional[str]:
        """Why class_image_generator = webui cannot work here (one sentence), or None when it can."""
        from dreambooth_ext.train.class_images import NOT_IN_WEBUI

        return NOT_IN_WEBUI

    def make_class_images(self, cfg, job) -> int:
        """Write the class images `cfg` lacks with the host's own txt2img; how many were made."""
        raise NotImplementedError

    def run_exclusive(self, fn: Callable[[], T], before: Optional[Callable[[], None]] = None) -> T:
        """Run training holding the host's GPU lock, with its own model moved off the GPU meanwhile;
        `before` runs first inside the lock, while the host's model is still in place."""
        if before is not None:
            before()
        return fn()
