"""OMC's hot loops on torch CPU kernels: decompression into a reused buffer and one-pass
(stochastic) re-quantization of a block, for the integer format at 8 bits or fewer.

The slow general path (any format, any width) is `compression.omc.quantize` / `dequantize`;
these kernels compute the same affine integer mapping with fewer passes and no per-call
allocation of block-sized tensors:

- `dequantize_into(codes_u8, alpha, beta, out)`: out = codes * alpha + beta (two passes over a
  block that stays in cache);
- `Rounder.quantize_into(w, lo, alpha, top, codes)`: codes = clamp(floor((w - lo) / alpha + r))
  with r uniform in (0, 1) at 2**-16 resolution (16 random bits per value, drawn 64 bits at a
  time from the seeded torch generator), or r = 1/2 for round to nearest. The block `w` is
  overwritten. The float -> uint8 narrowing goes through numpy (torch's direct float -> uint8
  copy is about 5x slower here).
- `Workspace`: one growable float32 buffer per model for decompressed blocks, tracked as
  transient parameter memory for as long as it exists.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Rounder", "Workspace", "dequantize_into"]

_R16 = 2.0 ** -16


def dequantize_into(codes: torch.Tensor, alpha: float, beta: float, out: torch.Tensor) -> torch.Tensor:
    """`out` (float32, codes.numel() values) = codes * alpha + beta; returns `out`. The
    integer -> float copy first: torch.mul(codes, alpha, out=) would cast into a fresh
    temporary and multiply in a second pass."""
    out.copy_(codes.reshape(out.shape))
    out.mul_(alpha)
    if beta:
        out.add_(beta)
    return out


class Rounder:
    """Quantizes float32 blocks to unsigned integer codes; stochastic when a generator is given."""

    def __init__(self, seed: int | None) -> None:
        # SFC64 through numpy: 64 random bits in about 1.2 ns here, 4x cheaper than torch's
        # mt19937 over the full int64 range.
        self.bitgen = None if seed is None else np.random.SFC64([seed & 0xFFFFFFFFFFFFFFFF, 0x5C])
        self._rand = np.empty(0, np.int16)

    def quantize_into(self, w: torch.Tensor, lo: float, alpha: float, top: int, codes: np.ndarray) -> None:
        """codes[:] = clamp(floor((w - lo) / alpha + r), 0, top); `w` (flat, contiguous float32)
        is overwritten. `codes` is a uint8 (top < 256) or uint16 numpy array of w.numel() values."""
        n = w.numel()
        if self.bitgen is None:
            w.sub_(lo - 0.5 * alpha).mul_(1.0 / alpha)  # floor(x + 1/2): round to nearest
        else:
            r = torch.from_numpy(self._random16(n))
            # r / 2**16 is uniform on [-1/2, 1/2) in steps of 2**-16; shifting by 1/2 + 2**-17
            # centres each of the 2**16 cells, so E[floor(x + u)] = x within 2**-17 of a code.
            w.sub_(lo - (0.5 + _R16 / 2) * alpha).mul_(1.0 / alpha).add_(r, alpha=_R16)
        w.clamp_(0, top)
        np.copyto(codes, w.numpy(), casting="unsafe")  # truncation == floor on [0, top]

    def _random16(self, n: int) -> np.ndarray:
        """n random int16 in a reused buffer, drawn in pieces of 128 KiB: numpy allocates each
        draw, and pieces that size come from the heap, not from fresh (page-faulting) pages."""
        if self._rand.size < n:
            self._rand = np.empty(n, np.int16)
        out = self._rand[:n]
        piece = 1 << 16
        for s in range(0, n, piece):
            e = min(n, s + piece)
            out[s:e] = self.bitgen.random_raw(-(-(e - s) // 4)).view(np.int16)[: e - s]
        return out

    def scratch_bytes(self) -> int:
        """The random-bit buffer (2 bytes per value of the largest block)."""
        return int(self._rand.nbytes)


class Workspace:
    """A float32 buffer reused for every decompressed block of one model (never shrinks)."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.buf = torch.empty(0)

    def get(self, n: int) -> torch.Tensor:
        if self.buf.numel() < n:
            self.buf = torch.empty(0)  # the old buffer is released (and untracked) first
            self.buf = self.tracker.track(torch.empty(n))
        return self.buf[:n]
