"""Stopping a training loop cleanly on Ctrl-C or SIGTERM (a scheduler's preemption).

Inside `GracefulStop`, the first SIGINT or SIGTERM only asks the loop to stop: it finishes the
step in hand, saves it and ends. A second signal interrupts at once (KeyboardInterrupt), as does
any signal outside the loop. Handlers are installed only in the main thread (Python's rule) and
restored on exit.
"""

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in SIGNALS}
            for s in SIGNALS:
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
