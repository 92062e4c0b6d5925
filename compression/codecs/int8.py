"""`int8`: symmetric 8-bit quantization, one scale per tensor or per output channel.

Wire layout: `nscales` float32 scales, then one int8 code per value. Scale = absmax / 127, so
the round-to-nearest error of a value is at most scale / 2.
"""

from __future__ import annotations

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._buf import CHUNK, TINY, chunks, expect_nbytes, flat32, view

__all__ = ["Int8"]

_GRANULARITIES = ("tensor", "channel")


@register_codec("int8")
class Int8(Codec):
    """Symmetric int8, round to nearest; `granularity` is "tensor" or "channel" (dim 0)."""

    def __init__(self, granularity: str = "tensor") -> None:
        if granularity not in _GRANULARITIES:
            raise ValueError(f"int8: granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity

    def config(self) -> dict:
        return {"granularity": self.granularity}

    def _rows(self, shape: tuple[int, ...]) -> int:
        return shape[0] if self.granularity == "channel" and len(shape) >= 2 else 1

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        n = xf.size
        rows = self._rows(tuple(x.shape))
        if n == 0:
            scale = np.zeros(rows, np.float32)
        elif rows == 1:
            mn, mx = torch.aminmax(torch.from_numpy(xf))
            scale = np.array([max(-float(mn), float(mx)) / 127.0], np.float32)
        else:
            m = torch.from_numpy(xf).view(rows, -1)
            scale = (torch.maximum(-m.amin(dim=1), m.amax(dim=1)) / 127.0).numpy()
        inv = np.where(scale > TINY, np.float32(1.0) / np.maximum(scale, TINY), 0).astype(np.float32)
        buf = np.empty(4 * rows + n, dtype=np.uint8)
        buf[: 4 * rows] = scale.view(np.uint8)
        codes = buf[4 * rows :].view(np.int8)
        tmp = np.empty(CHUNK, np.float32)
        # One pass over x in cache-sized blocks: scale, round half to even, clamp, narrow.
        for s, e, g0, nrow, w in chunks(n, max(1, n // rows)):
            t = tmp[: e - s].reshape(nrow, w)
            np.multiply(xf[s:e].reshape(nrow, w), inv[g0 : g0 + nrow, None], out=t)
            np.rint(t, out=t)
            np.clip(t, -127, 127, out=t)
            codes[s:e] = t.reshape(-1)
        return self._payload(x, {"rows": rows}, buf)

    def encode_many(self, xs: torch.Tensor, ctxs=None) -> list[Payload]:
        """One vectorized pass for B same-shape tensors (B clients): bytes equal to `encode` each."""
        b, shape = xs.shape[0], tuple(xs.shape[1:])
        rows = self._rows(shape)
        n = int(np.prod(shape, dtype=np.int64))
        if b == 0 or n == 0 or n * b > (1 << 24):  # tiny batches or big tensors: the blocked path
            return super().encode_many(xs, ctxs)
        m = xs.detach().to(torch.float32).reshape(b, rows, -1)
        scale = (torch.maximum(-m.amin(dim=2), m.amax(dim=2)) / 127.0).numpy()  # (b, rows)
        inv = np.where(scale > TINY, np.float32(1.0) / np.maximum(scale, TINY), 0).astype(np.float32)
        t = m.numpy() * inv[:, :, None]
        np.rint(t, out=t)
        np.clip(t, -127, 127, out=t)
        buf = np.empty((b, 4 * rows + n), dtype=np.uint8)
        buf[:, : 4 * rows] = scale.astype(np.float32).view(np.uint8).reshape(b, 4 * rows)
        buf[:, 4 * rows :] = t.reshape(b, n).astype(np.int8).view(np.uint8)
        proto = xs[0]
        return [self._payload(proto, {"rows": rows}, buf[i]) for i in range(b)]

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        rows = param(p, "rows", int, 1, max(n, 1))
        if n % rows:
            raise PayloadError(f"int8: {rows} scale rows do not divide {n} values")
        mv = expect_nbytes(p, 4 * rows + n)
        scales = view(mv, np.float32, rows, 0)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise PayloadError("int8: scales must be finite and non-negative")
        codes = view(mv, np.int8, n, 4 * rows).reshape(rows, -1)
        out = np.multiply(codes, scales[:, None], dtype=np.float32)
        return torch.from_numpy(out.reshape(p.shape)).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 * self._rows(shape) + int(np.prod(shape, dtype=np.int64))
