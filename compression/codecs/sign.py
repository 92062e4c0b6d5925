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
from ._buf import BIG_CHUNK, expect_nbytes, flat32, view

__all__ = ["ScaledSign", "Sign"]

def pack_signs(xf: np.ndarray, out: np.ndarray) -> None:
    """Write the sign bits of `xf` into `out` (ceil(n/8) bytes), in cache-sized blocks."""
    neg = np.empty(min(BIG_CHUNK, xf.size), np.bool_)
    for a in range(0, xf.size, BIG_CHUNK):
        e = min(xf.size, a + BIG_CHUNK)
        np.less(xf[a:e], 0, out=neg[: e - a])
        out[a // 8 : (e + 7) // 8] = np.packbits(neg[: e - a], bitorder="little")


def unpack_signs_into(bits: np.ndarray, out: np.ndarray, scale: float) -> None:
    """Decode sign bits into `out` (float32, n values) as +-scale, in blocks: unpack to one byte
    per value, turn 0/1 into +1/-1 as int8 (-u | 1), widen into `out`, then scale. Two cheap
    byte passes and one float32 write per value."""
    n = out.size
    for a in range(0, n, BIG_CHUNK):  # BIG_CHUNK is a multiple of 8: blocks start on a byte
        e = min(n, a + BIG_CHUNK)
        u = np.unpackbits(bits[a // 8 : (e + 7) // 8], count=e - a, bitorder="little")
        np.negative(u, out=u)
        np.bitwise_or(u, 1, out=u)
        o = out[a:e]
        np.copyto(o, u.view(np.int8), casting="unsafe")
        if scale != 1.0:
            np.multiply(o, np.float32(scale), out=o)


@register_codec("sign")
class Sign(Codec):
    """Signs only: 1 bit per value, decoded as +-1."""

    finite_output = True

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        out = np.empty((xf.size + 7) // 8, np.uint8)
        pack_signs(xf, out)
        return self._payload(x, {}, out)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        return self._decode_fresh(p, ctx)

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        unpack_signs_into(view(expect_nbytes(p, (n + 7) // 8), np.uint8, -1, 0), out, 1.0)

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return (math.prod(shape) + 7) // 8


@register_codec("scaled_sign")
class ScaledSign(Codec):
    """Signs times the mean absolute value (||x||_1 / d): 1 bit per value plus one float32."""

    finite_output = True

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        n = xf.size
        scale = float(torch.linalg.vector_norm(torch.from_numpy(xf), 1)) / n if n else 0.0
        out = np.empty(4 + (n + 7) // 8, np.uint8)
        out[:4] = np.array([scale], np.float32).view(np.uint8)
        pack_signs(xf, out[4:])
        return self._payload(x, {}, out)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        return self._decode_fresh(p, ctx)

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        mv = expect_nbytes(p, 4 + (n + 7) // 8)
        scale = float(view(mv, np.float32, 1, 0)[0])
        if not math.isfinite(scale) or scale < 0:
            raise PayloadError("scaled_sign: scale must be finite and non-negative")
        unpack_signs_into(view(mv, np.uint8, -1, 4), out, scale)

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 + (math.prod(shape) + 7) // 8
