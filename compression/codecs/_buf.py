"""Zero-copy views of payload bytes, with size checks done before any allocation."""

from __future__ import annotations

import numpy as np

from ..payload import Payload, PayloadError

__all__ = ["expect_nbytes", "view"]


def expect_nbytes(p: Payload, expected: int) -> memoryview:
    """Return `p.data` as a flat byte view, after checking it holds exactly `expected` bytes."""
    mv = memoryview(p.data).cast("B") if memoryview(p.data).format != "B" else memoryview(p.data)
    if mv.nbytes != expected:
        raise PayloadError(
            f"{p.codec}: payload has {mv.nbytes} bytes, shape {p.shape} with params "
            f"{dict(p.params)} needs exactly {expected}"
        )
    return mv


def view(mv: memoryview, dtype: np.dtype | str, count: int, offset: int) -> np.ndarray:
    """A read-only numpy view of `count` items of `dtype` at byte `offset` of `mv` (no copy)."""
    return np.frombuffer(mv, dtype=dtype, count=count, offset=offset)
