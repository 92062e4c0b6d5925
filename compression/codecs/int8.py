"""`int8`: symmetric 8-bit quantization, one scale per tensor or per output channel.

Wire layout: `nscales` float32 scales, then one int8 code per value. Scale = absmax / 127, so
the round-to-nearest error of a value is at most scale / 2.

Encode and decode make two or three passes per 1 MiB block (scale, round by a magic-number add,
narrow; widen, then scale) and no clamp: with scale = absmax / 127, |x / scale| is at most 127 plus a few ulp, which
rounds to 127. The decoder bounds every scale by FLT_MAX / 128, so no code (an int8 is at least
-128) can decode to infinity.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from ..accumulate import _ADD_CHUNK, ScaledAdd
from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._buf import BIG_CHUNK, TINY, chunks, expect_nbytes, flat32, readonly_tensor, view

__all__ = ["Int8"]

_GRANULARITIES = ("tensor", "channel")
_MAX_SCALE = float(np.finfo(np.float32).max / 128)
_F32 = struct.Struct("<f")
_ROUND = np.float32(1.5 * 2**23)  # x + _ROUND rounds x to an integer, half to even, for |x| < 2**22
_MANY_VALUES = 1 << 22  # fold_many: at most 32 MiB of float64 rows at once


@register_codec("int8")
class Int8(Codec):
    """Symmetric int8, round to nearest; `granularity` is "tensor" or "channel" (dim 0)."""

    finite_output = True

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
            scale = np.array([max(abs(float(mn)), abs(float(mx))) / 127.0], np.float32)  # +0.0 for zeros
        else:
            m = torch.from_numpy(xf).view(rows, -1)
            scale = (torch.maximum(m.amin(dim=1).abs(), m.amax(dim=1).abs()).double() / 127.0).float().numpy()
        inv = np.where(scale > TINY, np.float32(1.0) / np.maximum(scale, TINY), 0).astype(np.float32)
        buf = np.empty(4 * rows + n, dtype=np.uint8)
        buf[: 4 * rows] = scale.view(np.uint8)
        codes = buf[4 * rows :].view(np.int8)
        tmp = np.empty(min(BIG_CHUNK, max(n, 1)), np.float32)
        bits = tmp.view(np.int32)
        # One pass over x in cache-sized blocks: scale, round half to even by adding 1.5 * 2**23
        # (|x / scale| <= 127.x, so the float32 sum has a unit ulp: the addition rounds exactly as
        # np.rint would, and the integer sits in the low bits of the float's representation),
        # then narrow those bits to int8 (an integer cast: its low byte, the code in two's
        # complement). One cheap add and an int32 -> int8 cast instead of rint and a float cast.
        for s, e, g0, nrow, w in chunks(n, max(1, n // max(rows, 1)), BIG_CHUNK):
            t = tmp[: e - s].reshape(nrow, w)
            np.multiply(xf[s:e].reshape(nrow, w), inv[g0 : g0 + nrow, None], out=t)
            np.add(t, _ROUND, out=t)
            np.copyto(codes[s:e].reshape(nrow, w), bits[: e - s].reshape(nrow, w), casting="unsafe")
        return self._payload(x, {"rows": rows}, buf)

    def encode_many(self, xs: torch.Tensor, ctxs=None) -> list[Payload]:
        """One vectorized pass for B same-shape tensors (B clients): bytes equal to `encode` each."""
        b, shape = xs.shape[0], tuple(xs.shape[1:])
        rows = self._rows(shape)
        n = int(np.prod(shape, dtype=np.int64))
        if b == 0 or n == 0 or n * b > (1 << 24):  # tiny batches or big tensors: the blocked path
            return super().encode_many(xs, ctxs)
        m = xs.detach().to(torch.float32).reshape(b, rows, -1)
        scale = (torch.maximum(m.amin(dim=2).abs(), m.amax(dim=2).abs()).double() / 127.0).float().numpy()  # (b, rows): rounded as `encode` does
        inv = np.where(scale > TINY, np.float32(1.0) / np.maximum(scale, TINY), 0).astype(np.float32)
        t = m.numpy() * inv[:, :, None]
        np.rint(t, out=t)  # within [-127, 127] without a clamp (module docstring)
        buf = np.empty((b, 4 * rows + n), dtype=np.uint8)
        buf[:, : 4 * rows] = scale.astype(np.float32).view(np.uint8).reshape(b, 4 * rows)
        buf[:, 4 * rows :] = t.reshape(b, n).astype(np.int8).view(np.uint8)
        proto = xs[0]
        return [self._payload(proto, {"rows": rows}, buf[i]) for i in range(b)]

    def _codes(self, xs):
        """The whole-model pass of `encode_batch`: (names, shapes, sizes, offsets, scales (b,
        tensors) float32, codes (b, total) int8), or None where it does not apply."""
        names = list(xs)
        if self.granularity != "tensor" or not names:
            return None
        b = int(xs[names[0]].shape[0])
        shapes = [tuple(int(d) for d in xs[k].shape[1:]) for k in names]
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        total = sum(sizes)
        if b == 0 or min(sizes) == 0 or any(xs[k].shape[0] != b for k in names) or total * b > (1 << 24):
            return None
        x = torch.cat([xs[k].detach().to(torch.float32).reshape(b, -1) for k in names], dim=1).numpy()
        offs = np.cumsum([0] + sizes[:-1])
        absmax = np.maximum.reduceat(np.abs(x), offs, axis=1)  # (b, tensors)
        scale = (absmax.astype(np.float64) / 127.0).astype(np.float32)  # as `encode` rounds it
        inv = np.where(scale > TINY, np.float32(1.0) / np.maximum(scale, TINY), 0).astype(np.float32)
        t = x * np.repeat(inv, sizes, axis=1)
        np.rint(t, out=t)  # within [-127, 127] without a clamp (module docstring)
        with np.errstate(invalid="ignore"):  # a diverged (non-finite) update is refused by its scale, not here
            return names, shapes, sizes, offs, scale, t.astype(np.int8)

    def encode_fold_batch(self, xs, groups, alphas):
        """`encode_batch` then `fold_many` of each group, without the per-client payloads: each
        group's sums come straight from the codes and scales of the whole-model pass, in the same
        arithmetic as `fold_many` (codes widened and scaled in one multiply, rows summed in one
        reduction after a zero row), so bit-equal to it; the templates are client 0's payloads."""
        got = self._codes(xs)
        if got is None or not groups:
            return super().encode_fold_batch(xs, groups, alphas)
        names, shapes, sizes, offs, scale, codes = got
        widest = max(len(g) for g in groups) + 1
        if any(n > _ADD_CHUNK or widest * n > _MANY_VALUES for n in sizes):
            return super().encode_fold_batch(xs, groups, alphas)
        if not ((scale >= 0) & (scale <= _MAX_SCALE)).all():  # False for NaN too (as fold_many)
            raise PayloadError(f"int8: scales must be finite, non-negative and at most {_MAX_SCALE:.3e}")
        templates = {}
        for j, (k, shape, n, o) in enumerate(zip(names, shapes, sizes, offs)):
            buf = np.empty(4 + n, np.uint8)
            buf[:4] = scale[0, j : j + 1].view(np.uint8)
            buf[4:] = codes[0, o : o + n].view(np.uint8)
            templates[k] = Payload(self.name, self.version, str(xs[k].dtype).removeprefix("torch."), shape,
                                   {"rows": 1}, buf)
        a64, s64 = np.asarray(alphas, np.float64), scale.astype(np.float64)
        sums = []
        for g in groups:
            idx = np.asarray(g, np.int64)
            rows = codes[idx]
            coeff = a64[idx, None] * s64[idx]  # (len(g), tensors): alpha * scale, as fold_many
            out = {}
            for j, (k, n, o) in enumerate(zip(names, sizes, offs)):
                stack = np.empty((len(idx) + 1, n), np.float64)
                stack[0] = 0.0
                np.multiply(rows[:, o : o + n], coeff[:, j : j + 1], out=stack[1:])
                out[k] = torch.from_numpy(np.add.reduce(stack, axis=0)).view(shapes[j])
            sums.append(out)
        return templates, sums

    def encode_batch(self, xs):
        """Every tensor of B clients in a few whole-model passes (one absmax per tensor and client
        by `reduceat`, one multiply, one rounding), instead of a dozen small operations per
        tensor; each payload is a view of one buffer. Bytes equal to `encode` one by one."""
        got = self._codes(xs)
        if got is None:
            return super().encode_batch(xs)
        names, shapes, sizes, offs, scale, codes = got
        b, total = codes.shape
        codes = codes.view(np.uint8)
        buf = np.empty((b, total + 4 * len(names)), np.uint8)
        out, pos = {}, 0
        for j, (k, shape, n, o) in enumerate(zip(names, shapes, sizes, offs)):
            buf[:, pos : pos + 4] = scale[:, j : j + 1].view(np.uint8)
            buf[:, pos + 4 : pos + 4 + n] = codes[:, o : o + n]
            dtype = str(xs[k].dtype).removeprefix("torch.")
            out[k] = [Payload(self.name, self.version, dtype, shape, {"rows": 1}, buf[i, pos : pos + 4 + n])
                      for i in range(b)]
            pos += 4 + n
        return out

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        return self._decode_fresh(p, ctx)

    def _parts(self, p: Payload, n: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(rows, scales, codes) of a checked payload, validated."""
        rows = param(p, "rows", int, 1, max(n, 1))
        if n % rows:
            raise PayloadError(f"int8: {rows} scale rows do not divide {n} values")
        mv = expect_nbytes(p, 4 * rows + n)
        scales = view(mv, np.float32, rows, 0)
        if rows == 1:  # the common case, checked without three numpy reductions
            ok = 0.0 <= float(scales[0]) <= _MAX_SCALE  # False for NaN too
        else:
            ok = bool(np.isfinite(scales).all() and (scales >= 0).all() and (scales <= _MAX_SCALE).all())
        if not ok:
            raise PayloadError(f"int8: scales must be finite, non-negative and at most {_MAX_SCALE:.3e}")
        return rows, scales, view(mv, np.int8, n, 4 * rows)

    def fold(self, p: Payload, ctx: CodecContext = CodecContext(), *, scratch=None):
        """One scale per tensor: add alpha * scale * codes into the float64 sum in one mixed-dtype
        pass over the int8 bytes (no float32 copy); per-channel scales take the default path."""
        n = self._check(p)
        rows, scales, codes = self._parts(p, n)
        if rows != 1 or p.dtype != "float32":  # a declared narrower dtype is checked by decoding
            return super().fold(p, ctx, scratch=scratch)
        return ScaledAdd(readonly_tensor(codes), float(scales[0]))

    def fold_many(self, payloads, alphas, acc) -> None:
        """One scale per tensor and small tensors (the numpy path of `add_scaled_`): every
        payload's codes widened and scaled in one multiply, then `acc` and those rows summed in
        one reduction over the leading axis, which numpy adds row after row: bit for bit the sum
        of folding the payloads one by one. Other cases take the default."""
        p0 = payloads[0] if payloads else None
        n = self._check(p0) if p0 is not None else 0
        meta = None if p0 is None else (p0.codec, p0.version, p0.dtype, p0.shape, p0.params)
        if (p0 is None or p0.dtype != "float32" or param(p0, "rows", int, 1, max(n, 1)) != 1
                or n > _ADD_CHUNK or (len(payloads) + 1) * n > _MANY_VALUES
                or any((p.codec, p.version, p.dtype, p.shape, p.params) != meta for p in payloads)):
            return super().fold_many(payloads, alphas, acc)
        rows = np.empty((len(payloads), 4 + n), np.uint8)
        for i, p in enumerate(payloads):
            rows[i] = expect_nbytes(p, 4 + n)
        scales = rows[:, :4].copy().view(np.float32)[:, 0].astype(np.float64)
        if not ((scales >= 0) & (scales <= _MAX_SCALE)).all():  # False for NaN too
            raise PayloadError(f"int8: scales must be finite, non-negative and at most {_MAX_SCALE:.3e}")
        stack = np.empty((len(payloads) + 1, n), np.float64)
        a = acc.numpy().reshape(-1)
        stack[0] = a
        np.multiply(rows[:, 4:].view(np.int8), (np.asarray(alphas, np.float64) * scales)[:, None], out=stack[1:])
        np.add.reduce(stack, axis=0, out=a)

    def folder(self, meta: Payload):
        """One scale per tensor: metadata checked once; per upload only the size, the scale's
        range and a view of the codes (a few microseconds, against ~25 for `fold`)."""
        n = self._check(meta)
        rows = param(meta, "rows", int, 1, max(n, 1))
        if rows != 1 or meta.dtype != "float32":
            return super().folder(meta)
        size = 4 + n

        def prepare(data, scratch=None):
            if len(data) != size:
                raise PayloadError(f"int8: payload has {len(data)} bytes, shape {meta.shape} with params "
                                   f"{dict(meta.params)} needs exactly {size}")
            scale = _F32.unpack_from(data)[0]
            if not 0.0 <= scale <= _MAX_SCALE:  # False for NaN too
                raise PayloadError(f"int8: scales must be finite, non-negative and at most {_MAX_SCALE:.3e}")
            return ScaledAdd(np.frombuffer(data, np.int8, n, 4), scale)

        prepare.views_only = True  # no pass over the bytes: a server runs it without a CPU turn
        return prepare

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        rows, scales, codes = self._parts(p, n)
        for s, e, g0, nrow, w in chunks(n, max(1, n // max(rows, 1)), BIG_CHUNK):
            o = out[s:e]
            np.copyto(o, codes[s:e], casting="unsafe")  # int8 -> float32 is exact
            o2 = o.reshape(nrow, w)
            np.multiply(o2, scales[g0 : g0 + nrow, None], out=o2)

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 * self._rows(shape) + math.prod(shape)  # math.prod: ~1 us, np.prod ~10 (every upload)
