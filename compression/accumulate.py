"""Accumulating into float64 sums without a float64 temporary of the whole tensor."""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

__all__ = ["ADD_BLOCK", "ScaledAdd", "add_scaled_", "add_scaled_many_", "fold_kernels", "load_fold_kernels_soon",
           "readonly_tensor"]

_ADD_CHUNK = 1 << 18  # 2 MiB of float64: measured fastest here (0.5 ms per 1M int8 codes, 0.63 at 64K)
ADD_BLOCK = _ADD_CHUNK  # tensors over this many values add block by block (and in groups: add_scaled_many_)
# Idle float64 blocks for the widening, last used last: a server's many handler threads take the
# one most recently written (still in cache), not one per thread (up to 70 x 2 MiB, cold).
# list.pop and list.append are atomic; the list holds at most one block per concurrent add.
_FREE: list[torch.Tensor] = []


def add_scaled_(acc: torch.Tensor, src, alpha: float) -> None:
    """acc += alpha * src for a flat float64 tensor `acc` and a same-size flat `src` (a tensor or
    a numpy array) of any real dtype: int8 codes, float32 values. The product is formed in
    float64. torch's mixed-dtype add_ widens all of `src` into a fresh float64 temporary first
    (8 bytes per value of first-touch page faults); large inputs go one cache-sized block at a
    time through a reused buffer instead, small ones through numpy (a few microseconds
    against ~15 for torch's dispatch, which matters at 6 tensors per update and thousands of
    updates per second).

    Rounding: the numpy path rounds the product, then the sum; torch's vectorized add may fuse
    them (FMA). Both are deterministic for a given size, and a tensor's size fixes its path, so
    a job's sums do not depend on which path ran, only on its inputs."""
    n = src.numel() if isinstance(src, torch.Tensor) else src.size
    if n <= _ADD_CHUNK:
        a = acc.numpy().reshape(-1)  # a view: acc is contiguous
        s = src.numpy() if isinstance(src, torch.Tensor) else src
        np.add(a, np.multiply(s, alpha, dtype=np.float64), out=a)
        return
    if not isinstance(src, torch.Tensor):
        src = readonly_tensor(src)
    acc = acc.view(-1)
    if src.dtype == torch.float64:
        acc.add_(src, alpha=alpha)
        return
    _blocked(acc, [(src, alpha)], n)


def add_scaled_many_(acc: torch.Tensor, terms) -> None:
    """`add_scaled_(acc, src, alpha)` for each (src, alpha) of `terms`, in order, in one pass over
    `acc`: block by block, every term is added before the next block (a cache-sized block of the
    float64 sum is read and written once per k terms instead of k times). Each element sees the
    same operations in the same order as k calls of `add_scaled_`: the result is bit-identical."""
    terms = list(terms)
    n = acc.numel()
    if len(terms) < 2 or n <= _ADD_CHUNK:
        for src, alpha in terms:
            add_scaled_(acc, src, alpha)
        return
    acc = acc.view(-1)
    ts = [(s if isinstance(s, torch.Tensor) else readonly_tensor(s), a) for s, a in terms]
    wide = [(s, a) for s, a in ts if s.dtype == torch.float64]
    if wide:  # float64 sources add whole (add_scaled_); none of the codecs folds those
        for src, alpha in ts:
            add_scaled_(acc, src, alpha)
        return
    _blocked(acc, ts, n)


def _blocked(acc: torch.Tensor, terms: list, n: int) -> None:
    """acc += alpha * src for each term: in one fused pass per up to 8 terms where this process
    loaded the numba kernels (`fold_kernels`: the aggregation service does),
    else widened one block at a time through a reused buffer. Same bits either way."""
    kernels = _kernels or None  # never loaded here: a worker's fold does not pull in numba and LLVM
    if kernels is not None and acc.dtype == torch.float64 and acc.is_contiguous() and acc.numel() == n:
        srcs = [_flat_array(s, kernels.DTYPES) for s, _ in terms]
        if all(s is not None and s.size == n for s in srcs):  # else torch's checks refuse it
            kernels.add_terms(acc.numpy(), [(s, a) for s, (_, a) in zip(srcs, terms)])
            return
    _torch_blocked(acc, terms, n)


def _flat_array(src, dtypes) -> np.ndarray | None:
    """`src` as a flat contiguous numpy array of one of `dtypes`, or None (bfloat16, strided...)."""
    if isinstance(src, torch.Tensor):
        if src.dtype in (torch.bfloat16, torch.float16) or src.device.type != "cpu" or src.requires_grad:
            return None
        src = src.numpy()
    ok = src.dtype in dtypes and src.ndim == 1 and src.flags.c_contiguous
    return src if ok else None


def _torch_blocked(acc: torch.Tensor, terms: list, n: int) -> None:
    try:
        tmp = _FREE.pop()
    except IndexError:
        tmp = torch.empty(_ADD_CHUNK, dtype=torch.float64)
    try:
        for s in range(0, n, _ADD_CHUNK):
            e = min(n, s + _ADD_CHUNK)
            t, a = tmp[: e - s], acc[s:e]
            for src, alpha in terms:
                t.copy_(src[s:e])
                a.add_(t, alpha=alpha)
    finally:
        _FREE.append(tmp)


_kernels = None


def fold_kernels():
    """Load the fused numba kernels (`fold_numba`) for this process's large adds: compiled (or
    read from numba's cache) and checked once; then `add_scaled_` and `add_scaled_many_` use
    them. None where numba is missing, FEDRAY_FOLD_NUMBA=0, or the kernels do not give the bits
    torch's add gives here (a CPU without FMA), so that a job's sums never depend on which path
    ran. About 0.7 s and 120 MB of resident memory (LLVM, the same for any model): the
    aggregation service loads them (`AggregationCore` of a job that folds, through
    `load_fold_kernels_soon`, when the model has a tensor over `ADD_BLOCK` values or
    FEDRAY_FOLD_NUMBA=always); other processes keep the torch blocks unless they call this."""
    global _kernels
    if _kernels is None:
        found = False  # threads that ask meanwhile check too; either way they get the same bits
        if os.environ.get("FEDRAY_FOLD_NUMBA", "1") != "0":
            try:
                from . import fold_numba

                fold_numba.warm_up()
                if _same_bits_as_torch(fold_numba):
                    found = fold_numba
            except Exception:  # noqa: BLE001 - numba missing or unusable here: the torch path runs
                pass
        _kernels = found
    return _kernels or None


_LOADING = threading.Lock()
_loader: threading.Thread | None = None


def load_fold_kernels_soon() -> None:
    """`fold_kernels()` in a daemon thread, once per process: a server starts without waiting
    for numba; adds before the kernels are ready take the torch blocks (the same bits)."""
    global _loader
    with _LOADING:
        if _loader is None and _kernels is None:
            _loader = threading.Thread(target=fold_kernels, name="fedray-fold-kernels", daemon=True)
            _loader.start()


def _same_bits_as_torch(kernels) -> bool:
    """Whether `kernels.add_terms` reproduces `_torch_blocked` bit for bit: int8 and float32
    sources, one term and a group, sizes with odd tails after the vector loop (values whose
    rounding differs with and without FMA about half of the time)."""
    rng = np.random.default_rng(0)
    for n in (1039, 4111):
        start = rng.standard_normal(n)
        srcs = [rng.integers(-127, 128, n).astype(np.int8) for _ in range(6)]
        srcs.append(rng.standard_normal(n).astype(np.float32))
        terms = [(s, float(a)) for s, a in zip(srcs, rng.uniform(0.01, 3.0, len(srcs)))]
        for group in (terms[:1], terms):
            ref = torch.from_numpy(start.copy())
            _torch_blocked(ref, [(torch.from_numpy(s), a) for s, a in group], n)
            got = start.copy()
            kernels.add_terms(got, group)
            if not np.array_equal(got.view(np.int64), ref.numpy().view(np.int64)):
                return False
    return True


class ScaledAdd:
    """A fold (`Codec.fold`): `add(acc, alpha)` adds alpha * scale * src into the float64 sum
    `acc`. Its parts are public so that a sum can add several updates' folds in one pass
    (`add_scaled_many_`); the product alpha * scale is formed first, as `add_scaled_` gets it."""

    __slots__ = ("src", "scale")

    def __init__(self, src, scale: float = 1.0) -> None:
        self.src, self.scale = src, scale

    def __call__(self, acc: torch.Tensor, alpha: float) -> None:
        add_scaled_(acc.view(-1), self.src, alpha * self.scale)


_READONLY_WARNED = False


def readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array that may be read-only (payload bytes), for reading only."""
    global _READONLY_WARNED
    if _READONLY_WARNED or a.flags.writeable:
        return torch.from_numpy(a)
    import warnings

    # torch warns once per process that the buffer is not writable (we only read it); catching
    # that one warning costs ~0.1 ms, so only the first call pays for it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    _READONLY_WARNED = True
    return t
