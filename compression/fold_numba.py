"""Fused kernels for adding scaled sources into a float64 sum, compiled with numba (imported only
through `accumulate.fold_kernels`, which falls back to torch blocks when numba is missing, when
FEDRAY_FOLD_NUMBA=0, or when these kernels do not reproduce torch's bits on this CPU).

`add_terms(acc, terms)` computes, for each element i and each (src, alpha) of `terms` in order,

    acc[i] = fma(alpha, float64(src[i]), acc[i])

which is what torch's `acc.add_(src.double(), alpha=alpha)` computes on CPUs with FMA (its
vectorized loop is `vec::fmadd(other, alpha, self)`, and its scalar tail is contracted the same
way); `accumulate.fold_kernels` checks that on this machine before using them. Up to 8 terms are
added in one pass (`_fold8`: each float64 value is read and written once for all of them, and
the int8 codes are widened in registers, with no float64 temporary); a group of k terms is split
into passes of 8, 4, 2 and 1, in order, so each value sees the same operations in the same order
as k single adds: the bits are the same whatever the grouping.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["add_terms"]


@intrinsic
def _fma(typingctx, a, b, c):  # noqa: ANN001, ARG001
    """llvm.fma.f64: a * b + c with one rounding (one instruction on CPUs with FMA)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ARG001
        return builder.fma(*args)

    return sig, codegen


_opts = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@nb.njit(**_opts)
def _fold1(acc, s0, a0):  # noqa: ANN001
    for i in range(acc.size):
        acc[i] = _fma(a0, np.float64(s0[i]), acc[i])


@nb.njit(**_opts)
def _fold2(acc, s0, a0, s1, a1):  # noqa: ANN001
    for i in range(acc.size):
        v = _fma(a0, np.float64(s0[i]), acc[i])
        acc[i] = _fma(a1, np.float64(s1[i]), v)


@nb.njit(**_opts)
def _fold4(acc, s0, a0, s1, a1, s2, a2, s3, a3):  # noqa: ANN001
    for i in range(acc.size):
        v = _fma(a0, np.float64(s0[i]), acc[i])
        v = _fma(a1, np.float64(s1[i]), v)
        v = _fma(a2, np.float64(s2[i]), v)
        acc[i] = _fma(a3, np.float64(s3[i]), v)


@nb.njit(**_opts)
def _fold8(acc, s0, a0, s1, a1, s2, a2, s3, a3, s4, a4, s5, a5, s6, a6, s7, a7):  # noqa: ANN001
    for i in range(acc.size):
        v = _fma(a0, np.float64(s0[i]), acc[i])
        v = _fma(a1, np.float64(s1[i]), v)
        v = _fma(a2, np.float64(s2[i]), v)
        v = _fma(a3, np.float64(s3[i]), v)
        v = _fma(a4, np.float64(s4[i]), v)
        v = _fma(a5, np.float64(s5[i]), v)
        v = _fma(a6, np.float64(s6[i]), v)
        acc[i] = _fma(a7, np.float64(s7[i]), v)


_PASSES = ((8, _fold8), (4, _fold4), (2, _fold2), (1, _fold1))
# source dtypes the kernels take (numba compiles one version per combination, on first use)
DTYPES = frozenset(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32, np.float32))


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: payload views are read-only and staged copies writable, and numba
    compiles one version per combination; all read-only, one version serves every group."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def add_terms(acc: np.ndarray, terms: list[tuple[np.ndarray, float]]) -> None:
    """acc[i] = fma(alpha, src[i], acc[i]) for each (src, alpha) of `terms`, in order: `acc` a
    flat, contiguous, writable float64 array; each src a flat contiguous array of the same size
    and of a dtype in `DTYPES`."""
    i = 0
    while i < len(terms):
        for k, fn in _PASSES:
            if len(terms) - i >= k:
                args = []
                for src, alpha in terms[i : i + k]:
                    args += (_readonly(src), float(alpha))
                fn(acc, *args)
                i += k
                break


def warm_up() -> None:
    """Compile (or load from numba's cache) the int8 versions: the codes every int8 upload folds."""
    acc = np.zeros(3, np.float64)
    src = _readonly(np.zeros(3, np.int8))
    for k, _ in _PASSES:
        add_terms(acc, [(src, 1.0)] * k)
