"""`blockwise8` and `nf4`: bitsandbytes' blockwise formats in numpy (compression.md D.13).

Each block of `block` values is divided by its float32 absmax and every value is replaced by
the index of the nearest entry of a fixed, versioned codebook (so the table is not sent):
- blockwise8: bitsandbytes' signed dynamic map (create_dynamic_map(signed=True), 256 entries),
  block 4096: wire 4*ceil(d/4096) + d bytes;
- nf4: QLoRA's NormalFloat-4 levels (quantiles of N(0, 1)), block 64, two codes per byte:
  wire 4*ceil(d/64) + ceil(d/2) bytes = 4.5 bits per value.
Round to nearest, so biased (fine for broadcasts; wrap in `ef` for uploads).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._bits import pack, packed_nbytes, unpack
from ._buf import CHUNK, TINY, chunks, expect_nbytes, flat32, view

__all__ = ["Blockwise8", "NF4", "dynamic_map"]


def dynamic_map() -> np.ndarray:
    """bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`."""
    data: list[float] = []
    for i in range(7):
        items = 2**i + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10.0 ** (-6 + i)) * means
        data += scaled.tolist() + (-scaled).tolist()
    data += [0.0, 1.0]
    return np.array(sorted(data), np.float32)


_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


def _order_key(x: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 values of `x` (negatives: all bits flipped)."""
    b = x.view(np.uint32)
    return b ^ ((b >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))


class _Nearest:
    """Index of the nearest codebook entry, as np.searchsorted(mid, s) (the number of midpoints
    below s), without a binary search per value: the top 16 bits of an order-preserving key of
    s pick a cell of the float32 line; `below[cell]` midpoints lie under the whole cell and at
    most one (`inside[cell]`, +inf if none) within it, so code = below + (inside < s). NaN
    keys count every midpoint, as searchsorted does. About 4x faster than searchsorted here."""

    def __init__(self, mid: np.ndarray) -> None:
        self.mid = mid
        lo_key = np.arange(1 << 16, dtype=np.uint64).astype(np.uint32) << np.uint32(16)
        hi_key = lo_key | np.uint32(0xFFFF)
        # invert the key: negatives had every bit flipped, positives only the sign bit
        inv = lambda k: np.where(k >= np.uint32(0x80000000), k ^ np.uint32(0x80000000), ~k).view(np.float32)  # noqa: E731
        lo, hi = inv(lo_key), inv(hi_key)
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        nan = np.isnan(lo) | np.isnan(hi)
        below = np.searchsorted(mid, lo, side="left")  # midpoints < lo
        upto = np.searchsorted(mid, hi, side="right")  # midpoints <= hi
        if ((upto - below)[~nan] > 1).any():
            raise AssertionError("codebook midpoints closer than a 16-bit key cell")
        inside = np.where(upto > below, mid[np.minimum(below, mid.size - 1)], np.inf).astype(np.float32)
        below[nan] = mid.size
        inside[nan] = np.inf
        self.below, self.inside = below.astype(np.uint8), inside

    def __call__(self, s: np.ndarray, out: np.ndarray) -> None:
        cell = _order_key(s) >> np.uint32(16)
        np.take(self.below, cell, out=out)
        out += np.take(self.inside, cell) < s


class _Codebook(Codec):
    _table: np.ndarray
    _bits: int

    def __init__(self, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1 << 30:
            raise ValueError(f"{self.name}: block must be a positive integer, got {block!r}")
        self.block = block
        self._mid = ((self._table[1:] + self._table[:-1]) / 2).astype(np.float32)
        self._nearest = _Nearest(self._mid)

    def config(self) -> dict:
        return {"block": self.block}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        n = xf.size
        block = max(1, min(self.block, n))
        t = torch.from_numpy(xf)
        nb = n // block
        parts = [t[: nb * block].view(nb, block).abs().amax(dim=1)] if nb else []
        if nb * block < n:
            parts.append(t[nb * block :].abs().amax().reshape(1))
        absmax = torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)
        inv = np.where(absmax > TINY, 1 / np.maximum(absmax, TINY), 0).astype(np.float32)
        codes = np.empty(n, np.uint8)
        tmp = np.empty(CHUNK, np.float32)
        for a, e, g0, rows, w in chunks(n, block):
            s = tmp[: e - a].reshape(rows, w)
            np.multiply(xf[a:e].reshape(rows, w), inv[g0 : g0 + rows, None], out=s)
            self._nearest(s.reshape(-1), codes[a:e])
        data = np.concatenate([absmax.view(np.uint8), pack(codes, self._bits)])
        return self._payload(x, {"block": block}, data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        block = param(p, "block", int, 1, max(n, 1))
        groups = -(-n // block) if n else 0
        mv = expect_nbytes(p, 4 * groups + packed_nbytes(n, self._bits))
        absmax = view(mv, np.float32, groups, 0)
        if not np.isfinite(absmax).all() or (absmax < 0).any():
            raise PayloadError(f"{self.name}: block absmax values must be finite and non-negative")
        codes = unpack(view(mv, np.uint8, -1, 4 * groups), self._bits, n)
        out = np.empty(n, np.float32)
        for a, e, g0, rows, w in chunks(n, block):
            o = out[a:e].reshape(rows, w)
            np.take(self._table, codes[a:e].reshape(rows, w), out=o)
            o *= absmax[g0 : g0 + rows, None]
        return torch.from_numpy(out).reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        block = max(1, min(self.block, n))
        return 4 * (-(-n // block) if n else 0) + packed_nbytes(n, self._bits)


@register_codec("blockwise8")
class Blockwise8(_Codebook):
    """8-bit dynamic-map codes with one float32 absmax per block (bitsandbytes blockwise8)."""

    _table = dynamic_map()
    _bits = 8

    def __init__(self, block: int = 4096) -> None:
        super().__init__(block)


@register_codec("nf4")
class NF4(_Codebook):
    """NormalFloat-4 codes with one float32 absmax per block (QLoRA / bitsandbytes nf4)."""

    _table = _NF4
    _bits = 4

    def __init__(self, block: int = 64) -> None:
        super().__init__(block)
