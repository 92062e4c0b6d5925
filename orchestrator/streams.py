"""Stream deadlines for the aggregation service: a stream that keeps the server waiting is ended.

gRPC's synchronous server runs each call on a handler thread. A client that opens a stream and
then sends nothing (or half a message, or stops reading a download) holds that thread for as
long as it likes, and gRPC has no server-side idle timeout. `StreamWatchdog` tracks every open
stream and cancels (`context.cancel()`, the client sees CANCELLED) one that

- has waited more than `idle_s` for the client: no new message with payload bytes (empty chunks
  do not count) while the handler waits to read, or a response message not taken by the client;
- or has been open more than `max_s` in all.

Time spent by the server itself (decoding, waiting for a CPU turn, waiting for a round to open)
never counts as idle. One daemon thread checks the streams about four times per `idle_s`.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Iterator

__all__ = ["StreamWatchdog", "Watch"]


class Watch:
    """One stream's clocks. `waiting` is the monotonic time since which the handler waits for
    the client (None: the server is busy, not the client)."""

    __slots__ = ("context", "start", "waiting", "cancelled")

    def __init__(self, context) -> None:
        self.context = context
        self.start = time.monotonic()
        self.waiting: float | None = None
        self.cancelled = False

    def requests(self, it: Iterator, progress: Callable[[object], bool]) -> Iterator:
        """`it`'s messages; the time the handler waits for one counts as idle until a message
        for which `progress(msg)` is true arrives."""
        since = None
        while True:
            self.waiting = since = since or time.monotonic()
            try:
                msg = next(it)
            except StopIteration:
                return
            finally:
                self.waiting = None
            if progress(msg):
                since = None
            yield msg

    def responses(self, it: Iterator) -> Iterator:
        """`it`'s messages; the time gRPC takes to hand one to the client counts as idle."""
        for msg in it:
            self.waiting = time.monotonic()
            try:
                yield msg
            finally:
                self.waiting = None


class StreamWatchdog:
    """Cancels streams idle longer than `idle_s` or open longer than `max_s` (module docstring)."""

    def __init__(self, *, idle_s: float, max_s: float) -> None:
        if not (idle_s > 0 and max_s > 0):
            raise ValueError(f"idle_s and max_s must be > 0, got {idle_s} and {max_s}")
        self.idle_s, self.max_s = float(idle_s), float(max_s)
        self._streams: dict[int, Watch] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cancelled = 0  # streams ended by this watchdog, for metrics and tests
        self._thread = threading.Thread(target=self._run, name="fedray-stream-watchdog", daemon=True)
        self._thread.start()

    def open(self, context) -> tuple[int, Watch]:
        w = Watch(context)
        key = next(self._ids)
        with self._lock:
            self._streams[key] = w
        return key, w

    def close(self, key: int) -> None:
        with self._lock:
            self._streams.pop(key, None)

    def open_streams(self) -> int:
        return len(self._streams)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = min(1.0, self.idle_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                late = [w for w in self._streams.values() if not w.cancelled and (
                    now - w.start > self.max_s or (w.waiting is not None and now - w.waiting > self.idle_s))]
                for w in late:
                    w.cancelled = True
            for w in late:  # outside the lock: cancel wakes the stream's handler thread
                try:
                    w.context.cancel()
                except Exception:  # the call ended meanwhile
                    pass
                self.cancelled += 1
