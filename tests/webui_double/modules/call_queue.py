import threading


class FIFOLock:
    """modules/fifo_lock.py: FIFOLock (first come, first served); the same acquire/release/with protocol."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()

    def locked(self):  # double only: lets tests see the lock is held
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()


queue_lock = FIFOLock()  # modules/call_queue.py: queue_lock = fifo_lock.FIFOLock()
