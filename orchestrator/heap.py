"""The C heap of a process that receives uploads: freed megabyte buffers are kept for reuse.

gRPC hands each ~1 MB upload chunk to Python as a fresh buffer, which is freed once the chunk
is folded. glibc's default policy returns such memory to the kernel soon after (an `mmap` per
large block, or trimming a thread arena's top past 2x the last freed size), so the next chunk
page-faults its 256 pages back in: on the development machine about a quarter of a plain gRPC
server's CPU per 1 MB message (benchmarks/aggregation_load.py, docs/performance.md). Raising
the mmap and trim thresholds keeps those pages mapped and reused instead.

Cost: up to `trim_bytes` of freed memory stays mapped per malloc arena (glibc makes at most 8
per core), only after the process once used it; blocks over `mmap_bytes` are mapped and
unmapped as before. A no-op where the C library is not glibc. What a burst of uploads leaves
free beyond that is handed back by the shard's heap trimmer (`start_heap_trimmer` below,
and `trim_heap` when a round's sum is released): a 100M-parameter model's shard
stays under 3x fp32 plus its fixed overhead (benchmarks/big_model.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["keep_freed_buffers", "start_heap_trimmer", "trim_heap"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DONE: set[tuple[int, int]] = set()
_LOCK = threading.Lock()
_LIBC: list = []  # [the C library, or None where it is not glibc], loaded once


def _glibc():
    """glibc (ctypes), or None where the C library is another one or cannot be loaded."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.gnu_get_libc_version  # glibc only: other C libraries have other knobs
        except (OSError, AttributeError, TypeError):
            libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def keep_freed_buffers(mmap_bytes: int = 16 << 20, trim_bytes: int = 64 << 20) -> bool:
    """Keep freed heap blocks under `mmap_bytes` in the process, and an arena's free top up to
    `trim_bytes` (glibc `mallopt`); once per process per setting. Returns whether it applied."""
    key = (int(mmap_bytes), int(trim_bytes))
    with _LOCK:
        if key in _DONE:
            return True
        libc = _glibc()
        if libc is None:
            return False
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        # glibc caps the mmap threshold at 32 MiB (64-bit); mallopt returns 0 when it refuses
        ok = bool(mallopt(_M_MMAP_THRESHOLD, key[0])) and bool(mallopt(_M_TRIM_THRESHOLD, key[1]))
        if ok:
            _DONE.add(key)
        return ok


def trim_heap() -> None:
    """Give the free pages of every glibc heap back to the system (`malloc_trim`): what a
    round's uploads left free between live blocks. No-op where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def start_heap_trimmer(stop: threading.Event, *, period_s: float = 0.5, step: int = 32 << 20,
                       max_checks: int = 100_000_000) -> threading.Thread:
    """A daemon thread that calls `trim_heap` when the resident set has grown by `step` bytes
    since the last trim (checked every `period_s`), until `stop` is set: uploads arrive on many
    gRPC threads, whose heaps otherwise keep what a round's uploads freed (about 0.25x fp32 over
    a round of 8 clients of a 100M-parameter model, benchmarks/big_model.py)."""

    def run() -> None:
        last = _rss_bytes()
        for _ in range(max_checks):
            if stop.wait(period_s):
                return
            now = _rss_bytes()
            if now - last >= step:  # grown since the last trim: hand back what is free
                trim_heap()
                last = _rss_bytes()
            elif now < last:
                last = now

    t = threading.Thread(target=run, name="fedray-heap-trim", daemon=True)
    t.start()
    return t
