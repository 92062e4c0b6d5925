"""`qsgd` and `terngrad`: unbiased stochastic quantizers (compression.md D.3, D.4).

qsgd: per bucket of `bucket` values, the float32 L2 norm, then each value as sign and a level
l in [0, s] drawn so that E[l] = s|v|/norm; wire 4*ceil(d/bucket) + ceil(d*w/8) bytes with
w = 1 + ceil(log2(s + 1)) bits per value (code = 2*level + sign).
terngrad: one float32 scale s = max|clip(g)| per tensor, then each value in {-s, 0, s} with
P(nonzero) = |g|/s, 2 bits per value (code 0, 1, 2 for -s, 0, s); wire 4 + ceil(d/4) bytes.
Clipping at `clip` standard deviations (2.5 in the paper; 0 turns it off) trades bias for
variance; without it the codec is unbiased.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._bits import pack, packed_nbytes, unpack
from ._buf import CHUNK, TINY, chunks, expect_nbytes, flat32, view

__all__ = ["QSGD", "TernGrad"]


def _width(levels: int) -> int:
    return 1 + math.ceil(math.log2(levels + 1))


def _bucket_norms(xf: np.ndarray, bucket: int) -> np.ndarray:
    t = torch.from_numpy(xf)
    n = t.numel()
    nb = n // bucket
    parts = []
    if nb:
        parts.append(torch.linalg.vector_norm(t[: nb * bucket].view(nb, bucket), dim=1))
    if nb * bucket < n:
        parts.append(torch.linalg.vector_norm(t[nb * bucket :]).reshape(1))
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)


@register_codec("qsgd")
class QSGD(Codec):
    """QSGD with `levels` = s quantization levels per sign, normalized per bucket."""

    def __init__(self, levels: int = 7, bucket: int = 512) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 32767:
            raise ValueError(f"qsgd: levels must be an integer in 1..32767, got {levels!r}")
        if isinstance(bucket, bool) or not isinstance(bucket, int) or not 1 <= bucket <= 1 << 30:
            raise ValueError(f"qsgd: bucket must be a positive integer, got {bucket!r}")
        self.levels, self.bucket = levels, bucket

    def config(self) -> dict:
        return {"levels": self.levels, "bucket": self.bucket}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        n, s = xf.size, self.levels
        bucket = max(1, min(self.bucket, n))
        norms = _bucket_norms(xf, bucket).astype(np.float32)
        with np.errstate(divide="ignore"):
            gain = np.where(norms > s * TINY, np.float32(s) / np.maximum(norms, s * TINY), np.float32(0)).astype(np.float32)
        rng = ctx.generator()
        codes = np.empty(n, np.uint8 if _width(s) <= 8 else np.uint16)
        tmp = np.empty(CHUNK, np.float32)
        for a, e, g0, rows, w in chunks(n, bucket):
            t = tmp[: e - a].reshape(rows, w)
            xs = xf[a:e].reshape(rows, w)
            np.abs(xs, out=t)
            np.multiply(t, gain[g0 : g0 + rows, None], out=t)
            t += rng.random(e - a, dtype=np.float32).reshape(rows, w)
            np.floor(t, out=t)
            np.clip(t, 0, s, out=t)
            t *= 2
            t += xs < 0
            codes[a:e] = t.reshape(-1)
        data = np.concatenate([norms.view(np.uint8), pack(codes, _width(s))])
        return self._payload(x, {"levels": s, "bucket": bucket}, data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        s = param(p, "levels", int, 1, 32767)
        bucket = param(p, "bucket", int, 1, max(n, 1))
        groups = -(-n // bucket) if n else 0
        width = _width(s)
        mv = expect_nbytes(p, 4 * groups + packed_nbytes(n, width))
        norms = view(mv, np.float32, groups, 0)
        if not np.isfinite(norms).all() or (norms < 0).any():
            raise PayloadError("qsgd: bucket norms must be finite and non-negative")
        codes = unpack(view(mv, np.uint8, -1, 4 * groups), width, n)
        level = codes >> 1
        if n and int(level.max()) > s:
            raise PayloadError(f"qsgd: a level exceeds levels={s}")
        signed = np.where(codes & 1, -level.astype(np.float32), level.astype(np.float32))
        scale = norms / np.float32(s)
        out = np.empty(n, np.float32)
        for a, e, g0, rows, w in chunks(n, bucket):
            np.multiply(signed[a:e].reshape(rows, w), scale[g0 : g0 + rows, None],
                        out=out[a:e].reshape(rows, w))
        return torch.from_numpy(out).reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        bucket = max(1, min(self.bucket, n))
        return 4 * (-(-n // bucket) if n else 0) + packed_nbytes(n, _width(self.levels))


@register_codec("terngrad")
class TernGrad(Codec):
    """TernGrad: {-s, 0, s} per value with one scale per tensor, optional clipping."""

    def __init__(self, clip: float = 2.5) -> None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < math.inf:
            raise ValueError(f"terngrad: clip must be a number >= 0 (0 disables clipping), got {clip!r}")
        self.clip = float(clip)

    def config(self) -> dict:
        return {"clip": self.clip}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        n = xf.size
        t = torch.from_numpy(xf)
        bound = math.inf
        if self.clip > 0 and n > 1:
            bound = self.clip * float(t.std())
        scale = np.float32(min(float(t.abs().max()) if n else 0.0, bound))
        inv = np.float32(1.0 / scale) if scale > TINY else np.float32(0)
        rng = ctx.generator()
        codes = np.empty(n, np.uint8)
        tmp = np.empty(CHUNK, np.float32)
        for a, e, _, _, _ in chunks(n, CHUNK):
            m = tmp[: e - a]
            np.abs(xf[a:e], out=m)
            m *= inv
            keep = rng.random(e - a, dtype=np.float32) < m
            codes[a:e] = 1 + keep * np.where(xf[a:e] < 0, np.int8(-1), np.int8(1))
        data = np.concatenate([np.array([scale], np.float32).view(np.uint8), pack(codes, 2)])
        return self._payload(x, {}, data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        mv = expect_nbytes(p, 4 + packed_nbytes(n, 2))
        scale = float(view(mv, np.float32, 1, 0)[0])
        if not math.isfinite(scale) or scale < 0:
            raise PayloadError("terngrad: scale must be finite and non-negative")
        codes = unpack(view(mv, np.uint8, -1, 4), 2, n)
        if n and int(codes.max()) > 2:
            raise PayloadError("terngrad: code 3 is not a ternary value")
        lut = np.array([-scale, 0.0, scale], np.float32)
        out = np.take(lut, codes)
        return torch.from_numpy(out).reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 + packed_nbytes(math.prod(shape), 2)
