"""The WebUI adapter's progress: the host's progress bar and live preview, and its top-bar Interrupt and Skip."""

from dreambooth_ext.host.webui_modules import _m


class WebUIProgress:
    """Progress methods of WebUIHost (modules/shared_state.py: State)."""

    _progress_open = False

    def progress_begin(self, title: str, total: int) -> None:
        state = _m("shared").state
        # positional: A1111/Forge name it begin(job=...), SD.Next begin(title=..., api=None)
        state.begin(f"dreambooth: {title}")
        self._progress_open = True
        # modules/progress.py: progress = job_no/job_count + sampling_step/sampling_steps/job_count
        state.job_count, state.job_no = 1, 0
        state.sampling_steps, state.sampling_step = max(int(total), 1), 0
        state.textinfo = f"Training {title}"

    def progress_update(self, step: int, total: int, text: str) -> None:
        state = _m("shared").state
        state.sampling_steps, state.sampling_step = max(int(total), 1), int(step)
        state.textinfo = text

    def progress_end(self) -> None:
        if self._progress_open:  # State.end() reads time_start, which only begin() sets
            self._progress_open = False
            state = _m("shared").state
            state.textinfo = None  # the progress API would go on showing the last step's text
            state.end()

    def interrupted(self) -> bool:
        return bool(getattr(_m("shared").state, "interrupted", False))

    def skipped(self) -> bool:
        # shared_state.py: State.skip() (the top bar's Skip, /sdapi/v1/skip) sets `skipped`; begin() clears it
        return bool(getattr(_m("shared").state, "skipped", False))

    def clear_skip(self) -> None:
        _m("shared").state.skipped = False  # processing.py clears it the same way before its next image

    def preview(self, image_path: str) -> None:
        """shared_state.py: assign_current_image() sets current_image and bumps id_live_preview, which the
        progress API (modules/progress.py) sends as the live preview; its do_set_current_image() leaves the
        image alone while current_latent is None, as it is during training."""
        try:
            from PIL import Image

            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except OSError:  # a sample removed meanwhile: no preview, no error
            return
        state = _m("shared").state
        assign = getattr(state, "assign_current_image", None)
        if assign is not None:
            assign(image)
        else:  # older or other hosts: the same two fields by hand
            state.current_image = image
            state.id_live_preview = getattr(state, "id_live_preview", 0) + 1
