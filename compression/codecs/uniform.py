"""`uniform` and `int4`: b-bit uniform quantization, bit-packed (compression.md D.2).

Values are split into groups (the whole tensor, one row per output channel, or blocks of
`block` elements). Each group has a step and an offset; a code c in [0, L) decodes to
c * step + offset.
- symmetric: L = 2**b - 1 levels (2 for b = 1) on [-a, a] with a = absmax, so zero is exact;
  the wire carries a (one float32 per group).
- affine: L = 2**b levels on [min, max]; the wire carries (min, step) per group.
Round to nearest has error <= step / 2; stochastic rounding, floor(x / step + u) with u ~ U[0, 1)
from the context's generator, is unbiased with error < step.

Wire layout: G (symmetric) or 2G (affine: all mins, then all steps) float32, then the codes
packed at b bits each: 4*G*m + ceil(b*d/8) bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._bits import pack, packed_nbytes, unpack
from ._buf import BIG_CHUNK, TINY, chunks, expect_nbytes, flat32, view

__all__ = ["Int4", "Uniform"]

_MODES = ("symmetric", "affine")
_GRANULARITIES = ("tensor", "channel", "block")
_ROUNDINGS = ("nearest", "stochastic")
_HALF_MAX = float(np.finfo(np.float32).max) / 2


def _levels(bits: int, mode: str) -> int:
    if mode == "affine" or bits == 1:
        return 1 << bits
    return (1 << bits) - 1


def _group_minmax(xf: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    t = torch.from_numpy(xf)
    n = t.numel()
    nb = n // block
    mins, maxs = [], []
    if nb == 1 and block == n:
        mn, mx = torch.aminmax(t)  # whole-tensor reduction: much faster than along a dim
        return mn.reshape(1).numpy(), mx.reshape(1).numpy()
    if nb:
        rows = t[: nb * block].view(nb, block)
        # amin and amax separately: torch's aminmax(dim=1) is several times slower on CPU.
        mins.append(rows.amin(dim=1))
        maxs.append(rows.amax(dim=1))
    if nb * block < n:
        mn, mx = torch.aminmax(t[nb * block :])
        mins.append(mn.reshape(1))
        maxs.append(mx.reshape(1))
    if not mins:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return torch.cat(mins).numpy(), torch.cat(maxs).numpy()


def _step_offset(meta: np.ndarray, groups: int, bits: int, mode: str):
    """(step, offset) per group from the wire metadata; encoder and decoder share it."""
    levels = _levels(bits, mode)
    if mode == "symmetric":
        a = meta[:groups]
        step = a * np.float32(2.0 / (levels - 1))
        return step, -step * np.float32((levels - 1) / 2)
    return meta[groups:], meta[:groups]


# Adding 1.5 * 2**23 to a float32 in [0, 2**22) rounds it to the nearest integer (ties to even,
# like np.rint), which then sits in the low bits of the sum's bit pattern: one add replaces
# rint and leaves the code in the low byte for the narrowing copy.
_MAGIC = np.float32(1.5 * 2**23)


def _piecewise(n: int, block: int, bits: int) -> bool:
    """Whether every piece of `chunks(n, block, BIG_CHUNK)` starts on a whole byte of the packed
    stream, so that pieces can be packed and unpacked on their own while they are in cache."""
    per = 8 // math.gcd(bits, 8)
    return block % per == 0 or block >= n


def quantize(xf: np.ndarray, *, bits: int, mode: str, block: int, stochastic: bool, rng) -> np.ndarray:
    """Observe, quantize and pack `xf` (flat float32); return the wire bytes."""
    n = xf.size
    groups = -(-n // block)
    mn, mx = _group_minmax(xf, block)
    levels = _levels(bits, mode)
    if mode == "symmetric":
        meta = np.maximum(mx, -mn).astype(np.float32)
    else:
        meta = np.concatenate([mn, (mx - mn) * np.float32(1.0 / (levels - 1))]).astype(np.float32)
    step, off = _step_offset(meta, groups, bits, mode)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(step > TINY, np.float32(1.0) / step, np.float32(0.0)).astype(np.float32)
    out = np.empty(4 * meta.size + packed_nbytes(n, bits), np.uint8)
    out[: 4 * meta.size] = meta.view(np.uint8)
    packed = out[4 * meta.size :]
    piecewise = _piecewise(n, block, bits)
    codes = np.empty(min(BIG_CHUNK, n) if piecewise else n, np.uint8)
    tmp = np.empty(min(BIG_CHUNK, max(n, 1)), np.float32)
    noise = np.empty_like(tmp) if stochastic else None
    top = np.float32(levels - 1)
    center = (levels - 1) / 2
    # Symmetric: x / step lies in [-(L-1)/2, (L-1)/2] up to a few ulp, so adding the center and
    # rounding to nearest stays in [0, L-1]. Affine: subtract the group minimum first (x - min
    # is >= 0 and <= max - min, exactly rounded), so no cancellation can push a code outside
    # [0, L-1]. Stochastic rounding (floor(t + u)) is clamped at both ends: t can be a few ulp
    # below 0 (symmetric) and floor(-1e-7 + 0) is -1.
    add = np.float32(center + float(_MAGIC)) if center.is_integer() and not stochastic else None
    for s, e, g0, rows, w in chunks(n, block, BIG_CHUNK):
        t = tmp[: e - s].reshape(rows, w)
        x = xf[s:e].reshape(rows, w)
        if mode == "symmetric":
            np.multiply(x, inv[g0 : g0 + rows, None], out=t)
            if add is None:
                np.add(t, np.float32(center), out=t)
        else:
            np.subtract(x, mn[g0 : g0 + rows, None], out=t)
            np.multiply(t, inv[g0 : g0 + rows, None], out=t)
        if stochastic:
            u = rng.random(e - s, dtype=np.float32, out=noise[: e - s])
            np.add(t, u.reshape(rows, w), out=t)
            np.floor(t, out=t)
            np.clip(t, 0, top, out=t)
            src = t
        else:
            np.add(t, add if add is not None else _MAGIC, out=t)
            src = t.view(np.uint32)  # the code is the low byte
        c = codes[: e - s] if piecewise else codes[s:e]
        np.copyto(c.reshape(rows, w), src, casting="unsafe")
        if piecewise:
            packed[s * bits // 8 : (e * bits + 7) // 8] = pack(c, bits)
    if not piecewise:
        packed[:] = pack(codes, bits)
    return out


def dequantize_into(p: Payload, n: int, out: np.ndarray, *, bits: int, mode: str, block: int) -> None:
    """Validate sizes and metadata of payload `p`, then decode its n values into `out` (float32).

    Every group's values are bounded before anything is written, |off| + (2**b - 1) * step <=
    FLT_MAX / 2, so no code can decode to infinity (`Uniform.finite_output`).
    """
    groups = -(-n // block) if n else 0
    nmeta = groups * (1 if mode == "symmetric" else 2)
    mv = expect_nbytes(p, 4 * nmeta + packed_nbytes(n, bits))
    meta = view(mv, np.float32, nmeta, 0)
    if not np.isfinite(meta).all() or (meta[: groups if mode == "symmetric" else 0] < 0).any():
        raise PayloadError(f"{p.codec}: group scales must be finite (and non-negative)")
    with np.errstate(over="ignore"):
        step, off = _step_offset(meta, groups, bits, mode)
    if not (np.isfinite(step).all() and np.isfinite(off).all()) or (step < 0).any():
        raise PayloadError(f"{p.codec}: quantization steps must be finite and non-negative")
    top = (1 << bits) - 1
    if groups and float(np.max(np.abs(off.astype(np.float64)) + top * step.astype(np.float64))) > _HALF_MAX:
        raise PayloadError(f"{p.codec}: group ranges exceed the float32 range")
    data = view(mv, np.uint8, -1, 4 * nmeta)
    piecewise = _piecewise(n, block, bits)
    codes = None if piecewise else unpack(data, bits, n)
    # Symmetric with an integer center (bits >= 2): decode (c - center) * step, the center
    # subtracted on the bytes (as int8), so that the float pass is one widening and one multiply.
    levels = _levels(bits, mode)
    center = np.uint8((levels - 1) // 2) if mode == "symmetric" and bits >= 2 else None
    for s, e, g0, rows, w in chunks(n, block, BIG_CHUNK):
        c = unpack(data[s * bits // 8 : (e * bits + 7) // 8], bits, e - s) if piecewise else codes[s:e]
        o = out[s:e]
        if center is not None:
            np.copyto(o, np.subtract(c, center).view(np.int8), casting="unsafe")
            o = o.reshape(rows, w)
            np.multiply(o, step[g0 : g0 + rows, None], out=o)
        else:
            np.copyto(o, c, casting="unsafe")
            o = o.reshape(rows, w)
            np.multiply(o, step[g0 : g0 + rows, None], out=o)
            np.add(o, off[g0 : g0 + rows, None], out=o)


def dequantize(p: Payload, n: int, *, bits: int, mode: str, block: int) -> np.ndarray:
    """`dequantize_into` a fresh array."""
    out = np.empty(n, np.float32)
    dequantize_into(p, n, out, bits=bits, mode=mode, block=block)
    return out


def read_format(p: Payload, n: int) -> tuple[int, str, int]:
    bits = param(p, "bits", int, 1, 8)
    mode = param(p, "mode", str)
    if mode not in _MODES:
        raise PayloadError(f"{p.codec}: mode {mode!r} is not one of {_MODES}")
    block = param(p, "block", int, 1, max(n, 1))
    return bits, mode, block


@register_codec("uniform")
class Uniform(Codec):
    """b-bit uniform quantizer; see the module docstring for the wire format.

    Args:
        bits: 1..8 bits per value.
        mode: "symmetric" (absmax) or "affine" (min/max).
        granularity: "tensor", "channel" (one group per slice along dim 0) or "block".
        block: group size for granularity="block".
        rounding: "nearest" (deterministic) or "stochastic" (unbiased; seeded from the context).
    """

    finite_output = True

    def __init__(self, bits: int = 8, mode: str = "affine", granularity: str = "tensor",
                 block: int = 4096, rounding: str = "nearest") -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"{self.name}: bits must be an integer in 1..8, got {bits!r}")
        if mode not in _MODES:
            raise ValueError(f"{self.name}: mode must be one of {_MODES}, got {mode!r}")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"{self.name}: granularity must be one of {_GRANULARITIES}, got {granularity!r}")
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1 << 30:
            raise ValueError(f"{self.name}: block must be a positive integer, got {block!r}")
        if rounding not in _ROUNDINGS:
            raise ValueError(f"{self.name}: rounding must be one of {_ROUNDINGS}, got {rounding!r}")
        self.bits, self.mode, self.granularity = bits, mode, granularity
        self.block, self.rounding = block, rounding

    def config(self) -> dict:
        return {"bits": self.bits, "mode": self.mode, "granularity": self.granularity,
                "block": self.block, "rounding": self.rounding}

    def _group(self, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        if self.granularity == "block":
            return max(1, min(self.block, n))
        if self.granularity == "channel" and len(shape) >= 2 and shape[0] > 0:
            return max(1, n // shape[0])
        return max(1, n)

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        block = self._group(tuple(x.shape))
        stochastic = self.rounding == "stochastic"
        data = quantize(xf, bits=self.bits, mode=self.mode, block=block, stochastic=stochastic,
                        rng=ctx.generator() if stochastic else None)
        return self._payload(x, {"bits": self.bits, "mode": self.mode, "block": block}, data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        return self._decode_fresh(p, ctx)

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        bits, mode, block = read_format(p, n)
        dequantize_into(p, n, out, bits=bits, mode=mode, block=block)

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        groups = -(-n // self._group(shape)) if n else 0
        return 4 * groups * (1 if self.mode == "symmetric" else 2) + packed_nbytes(n, self.bits)


@register_codec("int4")
class Int4(Uniform):
    """4-bit symmetric blockwise quantization: `uniform` with bits=4, mode="symmetric",
    granularity="block"; 4 + 32/block bits per value (4.5 at the default block of 64)."""

    def __init__(self, block: int = 64, rounding: str = "nearest") -> None:
        super().__init__(bits=4, mode="symmetric", granularity="block", block=block, rounding=rounding)

    def config(self) -> dict:
        return {"block": self.block, "rounding": self.rounding}
