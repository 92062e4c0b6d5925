"""Zero-copy views of payload bytes, with size checks done before any allocation."""

from __future__ import annotations

import numpy as np

from ..accumulate import readonly_tensor  # noqa: F401  (re-exported for the codecs)
from ..payload import Payload, PayloadError

__all__ = ["BIG_CHUNK", "CHUNK", "TINY", "all_finite", "as_bytes", "readonly_tensor", "chunks", "expect_nbytes", "flat32", "nbytes_at_least", "view"]


def as_bytes(p: Payload) -> memoryview:
    """`p.data` as a flat unsigned-byte view (no copy)."""
    mv = memoryview(p.data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def expect_nbytes(p: Payload, expected: int) -> memoryview:
    """Return `p.data` as a flat byte view, after checking it holds exactly `expected` bytes."""
    mv = as_bytes(p)
    if mv.nbytes != expected:
        raise PayloadError(
            f"{p.codec}: payload has {mv.nbytes} bytes, shape {p.shape} with params "
            f"{dict(p.params)} needs exactly {expected}"
        )
    return mv


def nbytes_at_least(p: Payload, minimum: int) -> memoryview:
    """Like `expect_nbytes` for variable-size layouts: at least `minimum` bytes."""
    mv = as_bytes(p)
    if mv.nbytes < minimum:
        raise PayloadError(f"{p.codec}: payload has {mv.nbytes} bytes, needs at least {minimum}")
    return mv


def view(mv: memoryview, dtype: np.dtype | str, count: int, offset: int) -> np.ndarray:
    """A read-only numpy view of `count` items of `dtype` at byte `offset` of `mv` (no copy)."""
    return np.frombuffer(mv, dtype=dtype, count=count, offset=offset)


def all_finite(a: np.ndarray) -> bool:
    """Whether every value of a flat float array is finite, in blocks (no n-byte temporary)."""
    n = a.size
    if n <= BIG_CHUNK:
        return bool(np.isfinite(a).all())
    ok = np.empty(BIG_CHUNK, np.bool_)
    for s in range(0, n, BIG_CHUNK):
        e = min(n, s + BIG_CHUNK)
        if not np.isfinite(a[s:e], out=ok[: e - s]).all():
            return False
    return True


def flat32(x) -> np.ndarray:
    """`x` (a torch tensor) as a flat, contiguous float32 numpy array on the CPU (no copy when
    it already is one)."""
    import torch

    t = x.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.cpu().contiguous().reshape(-1).numpy()


# Smallest positive float32 whose reciprocal is finite: scales below it quantize to zero.
TINY = np.float32(4.0) / np.finfo(np.float32).max

# 64K float32 = 256 KiB: a block and its temporaries stay in L2 while a codec makes its several
# passes, so each element is read from memory once (compression.md E.5).
CHUNK = 1 << 16
# 256K float32 = 1 MiB: for loops of two or three cheap passes per block (int8, sign, 4-bit
# dequantize) numpy's per-call overhead matters more than L2 misses; measured 8-15% faster than
# CHUNK on 32M values here (single thread).
BIG_CHUNK = 1 << 18


def chunks(n: int, block: int, size: int = CHUNK):
    """Yield (start, stop, first_group, rows, width) covering [0, n) in pieces of about `size`
    elements, where x[start:stop].reshape(rows, width) has one group of `block` elements per row."""
    if block <= size:
        per = max(1, size // block) * block
        for s in range(0, n, per):
            e = min(n, s + per)
            full = (e - s) // block
            if full:
                yield s, s + full * block, s // block, full, block
            if s + full * block < e:
                yield s + full * block, e, s // block + full, 1, e - s - full * block
    else:
        for g in range(-(-n // block)):
            gs, ge = g * block, min(n, (g + 1) * block)
            for s in range(gs, ge, size):
                yield s, min(ge, s + size), g, 1, min(ge, s + size) - s
