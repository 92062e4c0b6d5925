"""Accumulating into float64 sums without a float64 temporary of the whole tensor."""

from __future__ import annotations

import threading

import torch

__all__ = ["add_scaled_"]

_LOCAL = threading.local()
_ADD_CHUNK = 1 << 18  # 2 MiB of float64: measured fastest here (0.5 ms per 1M int8 codes, 0.63 at 64K)


def add_scaled_(acc, src, alpha: float) -> None:
    """acc += alpha * src for a float64 `acc` and a same-size `src` of any real dtype (int8 codes,
    float32 values), both flat. torch's mixed-dtype add_ widens all of `src` into a fresh
    float64 temporary first (8 bytes per value of first-touch page faults); this widens one
    cache-sized block at a time into a per-thread buffer."""
    if src.dtype == torch.float64:
        acc.add_(src, alpha=alpha)
        return
    tmp = getattr(_LOCAL, "f64", None)
    if tmp is None:
        tmp = _LOCAL.f64 = torch.empty(_ADD_CHUNK, dtype=torch.float64)
    n = src.numel()
    for s in range(0, n, _ADD_CHUNK):
        e = min(n, s + _ADD_CHUNK)
        t = tmp[: e - s]
        t.copy_(src[s:e])
        acc[s:e].add_(t, alpha=alpha)
