"""How a recorder loop (watch, listen) is asked to stop: an Event from the caller, or SIGTERM / SIGINT.

The first signal asks the loop to finish what it is doing (the current file, the current batch) and
return; a second one raises KeyboardInterrupt there, which abandons it (its transaction rolls back).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self, external: threading.Event | None, finishing: str) -> None:
        self.external = external
        self.finishing = finishing  # what the first signal lets finish, e.g. "the current file"
        self.signals = 0

    @property
    def requested(self) -> bool:
        return self.signals > 0 or (self.external is not None and self.external.is_set())

    def handler(self, signum, frame) -> None:
        self.signals += 1
        if self.signals > 1:
            raise KeyboardInterrupt
        log.info("signal %d: finishing %s (send again to abandon it)", signum, self.finishing)

    @contextlib.contextmanager
    def signals_handled(self, enabled: bool = True) -> Iterator[StopRequest]:
        """SIGTERM and SIGINT go to :meth:`handler` inside the block (only where signals can be handled: in
        the main thread); the previous handlers are restored after it."""
        previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.handler)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
