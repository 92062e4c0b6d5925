"""OMC's hot loops for the integer format at 8 bits or fewer: decompression into a reused
buffer, the range of an SGD update and (stochastic) re-quantization.

The slow general path (any format, any width) is `compression.omc.quantize` / `dequantize`;
these compute the same affine integer mapping with fewer passes and no block-sized allocations:

- `dequantize_into(codes_u8, alpha, beta, out)`: out = codes * alpha + beta;
- `update_range(codes, grad, k, ws)`: min and max of codes + k * grad (the SGD update in code
  units: k = -lr / alpha);
- `Rounder.requantize(codes, grad, k, s, off, top, ws)`: codes = clamp(floor((codes + k * grad)
  * s + off + r), 0, top) in place, and `Rounder.quantize_into(w, lo, alpha, top, codes)`:
  codes = clamp(floor((w - lo) / alpha + r), 0, top). r is uniform on (0, 1) at 2**-16
  resolution (16 bits of SplitMix64 of a counter: four values per output, at the values'
  position in the rounder's stream, keyed by the seed), or 1/2 for round to nearest;
- `FlatStep`: a small model's 8-bit variables in one flat code array and one flat gradient
  array, so that the whole re-quantization is one numba call (`omc_numba.step_flat`);
- `Workspace`: one growable float32 buffer per model for decompressed blocks, tracked as
  transient parameter memory for as long as it exists.

Two implementations: fused numba kernels (`omc_numba`: one call per variable, no fp32 copy of
it) when numba imports and FEDRAY_OMC_NUMBA is not "0", else torch ops over blocks of the
workspace (the same random bits; the float arithmetic may round differently in the last bit,
so a code can differ by one where a value sits on a rounding boundary).
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["FlatStep", "Rounder", "Workspace", "dequantize_into", "numba_kernels", "random16_torch", "splitmix64",
           "update_range"]

_MASK64 = (1 << 64) - 1
_G, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_RANGE_CHUNK = 1024  # values per chunk of the numba range kernel's scratch (4 KiB)
_nb = None


def numba_kernels():
    """The `omc_numba` module, or None (numba missing, or FEDRAY_OMC_NUMBA=0)."""
    global _nb
    if _nb is None:
        _nb = False
        if os.environ.get("FEDRAY_OMC_NUMBA", "1") != "0":
            try:
                from . import omc_numba

                _nb = omc_numba
            except Exception:  # noqa: BLE001 - numba missing or unusable here: the torch path runs
                pass
    return _nb or None


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def splitmix64(x: int) -> int:
    """SplitMix64's output for state `x` (Python ints, for scalar keys)."""
    z = (x + _G) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def random16_torch(key: int, counter: int, n: int) -> torch.Tensor:
    """float32 (b + 1/2) * 2**-16 for n values, b the 16-bit lanes (little-endian) of SplitMix64
    outputs counter .. counter + ceil(n / 4) - 1 of `key` (torch int64 ops wrap like the numba
    kernel's uint64; shifts are masked to be logical)."""
    z = torch.arange(counter + 1, counter + 1 + -(-n // 4), dtype=torch.int64).mul_(_signed(_G)).add_(_signed(key))
    z = z.bitwise_xor_(z.bitwise_right_shift(30).bitwise_and_((1 << 34) - 1)).mul_(_signed(_M1))
    z = z.bitwise_xor_(z.bitwise_right_shift(27).bitwise_and_((1 << 37) - 1)).mul_(_signed(_M2))
    z = z.bitwise_xor_(z.bitwise_right_shift(31).bitwise_and_((1 << 33) - 1))
    b = z.view(torch.int16)[:n].to(torch.int32).bitwise_and_(0xFFFF)
    return b.to(torch.float32).add_(0.5).mul_(2.0 ** -16)


def dequantize_into(codes: torch.Tensor, alpha: float, beta: float, out: torch.Tensor) -> torch.Tensor:
    """`out` (float32, codes.numel() values) = codes * alpha + beta; returns `out`. The
    integer -> float copy first: torch.mul(codes, alpha, out=) would cast into a fresh
    temporary and multiply in a second pass."""
    out.copy_(codes.reshape(out.shape))
    out.mul_(alpha)
    if beta:
        out.add_(beta)
    return out


def update_range(codes: np.ndarray, grad: torch.Tensor | None, k: float, ws: "Workspace") -> tuple[float, float]:
    """(min, max) of codes + k * grad over a flat uint8 code array and its flat float32 gradient
    (None: of the codes alone), in blocks of the workspace."""
    nb = numba_kernels()
    n = codes.size
    if nb is not None:
        g = grad.numpy() if grad is not None else _EMPTY
        return nb.update_range(codes, g, float(k), ws.scratch(n))
    ct, lo, hi, step = torch.from_numpy(codes), float("inf"), float("-inf"), ws.chunk()
    for s in range(0, n, step):
        e = min(n, s + step)
        w = ws.get(e - s).copy_(ct[s:e])
        if grad is not None:
            w.add_(grad[s:e], alpha=k)
        mn, mx = torch.aminmax(w)
        lo, hi = min(lo, float(mn)), max(hi, float(mx))
    return lo, hi


_EMPTY = np.empty(0, np.float32)


class Rounder:
    """Quantizes to unsigned integer codes; stochastic when a seed is given.

    The random offset of the i-th value rounded is a function of (seed, i) alone: a counter
    advances by the number of values of each call, so a model's rounding is reproducible from
    its seed, whichever implementation runs.
    """

    def __init__(self, seed: int | None) -> None:
        self.stochastic = seed is not None
        self.key = splitmix64(splitmix64(seed & _MASK64) ^ 0x5C) if seed is not None else 0
        self.counter = 0
        self._scratch = 0

    def _advance(self, n: int) -> int:
        c = self.counter
        self.counter = (c + -(-n // 4)) & _MASK64  # SplitMix64 outputs used: 4 values each
        return c

    def requantize(self, codes: np.ndarray, grad: torch.Tensor | None, k: float, s: float, off: float, top: int,
                   ws: "Workspace") -> None:
        """codes[:] = clamp(floor((codes + k * grad) * s + off + r), 0, top) for a flat uint8
        code array and its flat float32 gradient (None: codes * s + off)."""
        n = codes.size
        c = self._advance(n) if self.stochastic else 0
        nb = numba_kernels()
        if nb is not None:
            g = grad.numpy() if grad is not None else _EMPTY
            nb.requantize(codes, g, float(k), float(s), float(off), float(top), self.stochastic, np.uint64(self.key),
                          np.uint64(c))
            return
        ct, step = torch.from_numpy(codes), ws.chunk()
        for st in range(0, n, step):
            e = min(n, st + step)
            w = ws.get(e - st).copy_(ct[st:e])
            if grad is not None:
                w.add_(grad[st:e], alpha=k)
            w.mul_(s).add_(off)
            self._finish(w, top, c + st // 4, ct[st:e])

    def quantize_into(self, w: torch.Tensor, lo: float, alpha: float, top: int, codes: np.ndarray) -> None:
        """codes[:] = clamp(floor((w - lo) / alpha + r), 0, top); `w` (flat, contiguous float32)
        may be overwritten. `codes` is a uint8 numpy array of w.numel() values."""
        n = w.numel()
        c = self._advance(n) if self.stochastic else 0
        nb = numba_kernels()
        if nb is not None:
            nb.quantize(w.numpy(), float(lo), 1.0 / alpha, float(top), self.stochastic, np.uint64(self.key), np.uint64(c),
                        codes)
            return
        w.sub_(lo).mul_(1.0 / alpha)
        self._finish(w, top, c, torch.from_numpy(codes))

    def _finish(self, w: torch.Tensor, top: int, c: int, out: torch.Tensor) -> None:
        """out = clamp(floor(w + r), 0, top) (torch path; `w` is overwritten)."""
        if self.stochastic:
            w.add_(random16_torch(self.key, c, w.numel()))
            self._scratch = max(self._scratch, 10 * w.numel())
        else:
            w.add_(0.5)
        w.clamp_(0, top)
        np.copyto(out.numpy(), w.numpy(), casting="unsafe")  # truncation == floor on [0, top]

    def scratch_bytes(self) -> int:
        """Random-bit scratch: 2 KiB per call with numba, the largest temporaries of one block on
        the torch path."""
        return self._scratch if numba_kernels() is None else 2048


class Workspace:
    """A float32 buffer reused for every decompressed block of one model (never shrinks).
    `block`: values per block of the torch paths while the buffer holds fewer than 1024."""

    def __init__(self, tracker, block: int = 1 << 14) -> None:
        self.tracker = tracker
        self.block = max(1, block)
        self.buf = torch.empty(0)

    def chunk(self) -> int:
        """Values per block of the torch paths: the buffer as it is, if not tiny (a multiple of 4:
        a block starts at a whole SplitMix64 output of the rounding stream)."""
        return max(4, (self.buf.numel() if self.buf.numel() >= 1024 else self.block) & ~3)

    def scratch(self, n: int) -> np.ndarray:
        """Float32 scratch for the numba range kernel: up to 1024 values, within the buffer as it
        is (or one block), so that it never grows the workspace past the block size."""
        return self.get(max(1, min(n, _RANGE_CHUNK, max(self.buf.numel(), self.block)))).numpy()

    def get(self, n: int) -> torch.Tensor:
        if self.buf.numel() < n:
            self.buf = torch.empty(0)  # the old buffer is released (and untracked) first
            self.buf = self.tracker.track(torch.empty(n))
        return self.buf[:n]


class FlatStep:
    """The 8-bit variables `qps` (objects with buf, grad, alpha, beta, n, shape) moved into one
    flat uint8 code array (each `buf` becomes a view of it) and given views `gview` of one flat
    float32 gradient array (layers write their weight gradient there: no allocation per step).
    `run` re-quantizes every variable that has a gradient in one numba call, in the order given;
    it returns False, doing nothing, without numba (the caller then steps them one by one)."""

    def __init__(self, qps: list, rounder: Rounder, ws: Workspace) -> None:
        self.qps, self.rounder, self.ws = list(qps), rounder, ws
        sizes = [qp.n for qp in self.qps]
        self.starts = np.zeros(len(sizes) + 1, np.int64)
        self.starts[1:] = np.cumsum(sizes)
        self.codes = np.empty(int(self.starts[-1]), np.uint8)
        self.grads = torch.zeros(int(self.starts[-1]))
        self.has_grad = np.zeros(len(sizes), np.bool_)
        self.alphas, self.betas = np.zeros(len(sizes)), np.zeros(len(sizes))
        for qp, s, e in zip(self.qps, self.starts[:-1], self.starts[1:]):
            self.codes[s:e] = qp.buf
            qp.buf = self.codes[s:e]
            qp.gview = self.grads[s:e].view(qp.shape)

    def run(self, lr: float) -> bool:
        nb = numba_kernels()
        if nb is None:
            return False
        for i, qp in enumerate(self.qps):
            g = qp.grad
            self.has_grad[i] = g is not None
            if g is not None and g is not qp.gview:
                qp.gview.copy_(g)  # e.g. a convolution's or a recurrent layer's own gradient tensor
            self.alphas[i], self.betas[i] = qp.alpha, qp.beta
        r = self.rounder
        scratch = self.ws.scratch(len(self.codes))
        c = nb.step_flat(self.codes, self.grads.numpy(), self.starts, self.has_grad, self.alphas, self.betas, float(lr),
                         255.0, r.stochastic, np.uint64(r.key), np.uint64(r.counter), scratch)
        r.counter = int(c)
        for i, qp in enumerate(self.qps):
            if self.has_grad[i]:
                qp.alpha, qp.beta, qp.grad = float(self.alphas[i]), float(self.betas[i]), None
        return True
