"""`sign` and `scaled_sign`: one bit per value (compression.md D.5, D.6).

sign: bit i set means value i is negative; decodes to -1 or +1 (signSGD sends no magnitude).
Wire ceil(d/8) bytes.
scaled_sign: a float32 scale ||x||_1 / d, then the sign bits; decodes to +-scale (the
EF-signSGD compressor; wrap it in `ef` for error feedback). Wire 4 + ceil(d/8) bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError
from ._buf import CHUNK, expect_nbytes, flat32, view

__all__ = ["ScaledSign", "Sign"]

# Byte -> its 8 bits as +1 / -1 (bit set = negative), for a one-gather decode.
_PATTERNS = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"), -1.0, 1.0
).astype(np.float32)


def pack_signs(xf: np.ndarray, out: np.ndarray) -> None:
    """Write the sign bits of `xf` into `out` (ceil(n/8) bytes), in cache-sized blocks."""
    neg = np.empty(CHUNK, np.bool_)
    for a in range(0, xf.size, CHUNK):
        e = min(xf.size, a + CHUNK)
        np.less(xf[a:e], 0, out=neg[: e - a])
        out[a // 8 : (e + 7) // 8] = np.packbits(neg[: e - a], bitorder="little")


def unpack_signs(bits: np.ndarray, n: int, scale: float) -> np.ndarray:
    table = _PATTERNS if scale == 1.0 else _PATTERNS * np.float32(scale)
    out = np.empty((bits.size, 8), np.float32)
    step = CHUNK // 8
    for a in range(0, bits.size, step):
        np.take(table, bits[a : a + step], axis=0, out=out[a : a + step])
    return out.reshape(-1)[:n]


@register_codec("sign")
class Sign(Codec):
    """Signs only: 1 bit per value, decoded as +-1."""

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        out = np.empty((xf.size + 7) // 8, np.uint8)
        pack_signs(xf, out)
        return self._payload(x, {}, out)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        bits = view(expect_nbytes(p, (n + 7) // 8), np.uint8, -1, 0)
        out = unpack_signs(bits, n, 1.0)
        return torch.from_numpy(out).reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return (math.prod(shape) + 7) // 8


@register_codec("scaled_sign")
class ScaledSign(Codec):
    """Signs times the mean absolute value (||x||_1 / d): 1 bit per value plus one float32."""

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        n = xf.size
        scale = float(torch.linalg.vector_norm(torch.from_numpy(xf), 1)) / n if n else 0.0
        out = np.empty(4 + (n + 7) // 8, np.uint8)
        out[:4] = np.array([scale], np.float32).view(np.uint8)
        pack_signs(xf, out[4:])
        return self._payload(x, {}, out)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        mv = expect_nbytes(p, 4 + (n + 7) // 8)
        scale = float(view(mv, np.float32, 1, 0)[0])
        if not math.isfinite(scale) or scale < 0:
            raise PayloadError("scaled_sign: scale must be finite and non-negative")
        out = unpack_signs(view(mv, np.uint8, -1, 4), n, scale)
        return torch.from_numpy(out).reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 + (math.prod(shape) + 7) // 8
