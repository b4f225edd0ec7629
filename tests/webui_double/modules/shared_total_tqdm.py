"""modules/shared_total_tqdm.py (A1111 v1.10.1, the same in Forge): the console's "Total progress" bar.

The sampler counts each step on it (sd_samplers_common.py update_step -> total_tqdm.update()), which opens
the bar when none is open; the WebUI's txt2img closes it after each generation (modules/txt2img.py
txt2img, modules/api/api.py text2imgapi: shared.total_tqdm.clear()). A bar left open keeps counting the
steps of later generations. `steps` is what the open bar shows and `closed` the counts of the bars closed
(double only)."""


class TotalTQDM:
    def __init__(self):
        self._tqdm = None
        self.steps = 0  # double only
        self.closed = []  # double only

    def reset(self):  # shared_total_tqdm.py: a new bar
        self._tqdm, self.steps = object(), 0

    def update(self):  # shared_total_tqdm.py: update() opens a bar when none is open
        if self._tqdm is None:
            self.reset()
        self.steps += 1

    def updateTotal(self, new_total):  # noqa: N802 (the WebUI's name)
        if self._tqdm is None:
            self.reset()

    def clear(self):  # shared_total_tqdm.py: clear() closes the open bar
        if self._tqdm is not None:
            self.closed.append(self.steps)
            self._tqdm, self.steps = None, 0

    @property
    def open(self):  # double only
        return self._tqdm is not None
