import threading


class FIFOLock:
    """modules/fifo_lock.py: FIFOLock (first come, first served); the same acquire/release/with protocol."""

    def __init__(self):
        self._lock = threading.Lock()
        self.holder = None  # double only: the thread holding it, so tests can see who refreshes under it

    def acquire(self, blocking=True):
        got = self._lock.acquire(blocking)
        if got:
            self.holder = threading.get_ident()
        return got

    def release(self):
        self.holder = None
        self._lock.release()

    def locked(self):  # double only: lets tests see the lock is held
        return self._lock.locked()

    def held_by_me(self):  # double only
        return self._lock.locked() and self.holder == threading.get_ident()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()


queue_lock = FIFOLock()  # modules/call_queue.py: queue_lock = fifo_lock.FIFOLock()
