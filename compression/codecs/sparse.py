"""`topk`, `threshold`, `randomk`: sparsification (compression.md D.7, D.8, D.9).

topk / threshold wire layout: the k kept indices, Elias-Fano coded (sorted; low bits plain,
high parts as unary deltas: ef_nbytes(k, d) ~ k(log2(d/k) + 2) bits), then the k values as a
nested payload of the `values` codec (float32 by default: 4k bytes). Params: k, and the values
payload's codec, version and params under "v.".
randomk: only the values travel (scaled by d/k, so the codec is unbiased); the indices are
regenerated from the `seed` param, itself drawn from the context.

All three are biased except randomk: wrap topk and threshold in `ef` for uploads.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._bits import ef_decode, ef_encode, ef_nbytes
from ._buf import CHUNK, as_bytes, flat32, view
from ._nest import build, max_wire_bytes, nest, unnest

__all__ = ["RandomK", "Threshold", "TopK"]

_V = "v."
_METHODS = ("exact", "sampled")


def _ratio(owner: str, name: str, v: Any, *, open_low: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1 if open_low else 0 <= v < 1):
        rng = "(0, 1]" if open_low else "[0, 1)"
        raise ValueError(f"{owner}: {name} must be a number in {rng}, got {v!r}")
    return float(v)


def _k(ratio: float, n: int) -> int:
    return 0 if n == 0 else min(n, max(1, math.ceil(ratio * n)))


def _above(xf: np.ndarray, thr: float) -> np.ndarray:
    """Indices of |x| >= thr, in order, computed in cache-sized blocks."""
    tmp = np.empty(CHUNK, np.float32)
    hit = np.empty(CHUNK, np.bool_)
    parts = []
    thr32 = np.float32(thr)
    for a in range(0, xf.size, CHUNK):
        e = min(xf.size, a + CHUNK)
        np.abs(xf[a:e], out=tmp[: e - a])
        np.greater_equal(tmp[: e - a], thr32, out=hit[: e - a])
        nz = np.flatnonzero(hit[: e - a])
        if nz.size:
            parts.append(nz + a)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _largest(xf: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """The k entries of `idx` with the largest |x|, sorted by index."""
    if idx.size <= k:
        return idx
    mag = np.abs(xf[idx])
    return np.sort(idx[np.argpartition(mag, idx.size - k)[idx.size - k :]])


class _Sparse(Codec):
    """Shared wire format of topk and threshold (indices + nested values payload)."""

    def _init_values(self, values: str | Codec, values_params: Mapping[str, Any] | None) -> None:
        self.values = build(values, values_params, self.name)

    def _values_config(self) -> dict:
        return {"values": self.values.name, "values_params": self.values.config()}

    def _select(self, xf: np.ndarray, ctx: CodecContext) -> np.ndarray: ...

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        idx = self._select(xf, ctx).astype(np.int64, copy=False)
        vp = self.values.encode(torch.from_numpy(xf[idx]), ctx)
        data = np.concatenate([ef_encode(idx, xf.size), np.asarray(memoryview(vp.data)).reshape(-1)])
        return self._payload(x, {"k": int(idx.size), **nest(_V, vp)}, data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        k = param(p, "k", int, 0, n)
        mv = as_bytes(p)
        nidx = ef_nbytes(k, n)
        if mv.nbytes < nidx:
            raise PayloadError(f"{self.name}: payload has {mv.nbytes} bytes, its {k} indices need {nidx}")
        idx = ef_decode(view(mv, np.uint8, nidx, 0), k, n, self.name)
        vp = unnest(p, _V, self.values, shape=(k,), dtype="float32", data=mv[nidx:])
        vals = self.values.decode(vp, ctx)
        if tuple(vals.shape) != (k,):
            raise PayloadError(f"{self.name}: values decode to shape {tuple(vals.shape)}, expected ({k},)")
        out = torch.zeros(n, dtype=torch.float32)
        out[torch.from_numpy(idx)] = vals.to(torch.float32)
        return out.reshape(p.shape).to(getattr(torch, p.dtype))

    def max_wire_bytes(self, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        return ef_nbytes(n, n) + max_wire_bytes(self.values, (n,))


@register_codec("topk")
class TopK(_Sparse):
    """The k = ceil(ratio * d) largest |x|.

    method="exact" selects them exactly (a partial sort); method="sampled" estimates the
    threshold from a 1% strided sample (DGC) and re-selects exactly only when too many pass,
    so the count k' is close to, not always equal to, k.
    """

    def __init__(self, ratio: float = 0.01, method: str = "exact", values: str = "identity",
                 values_params: Mapping[str, Any] | None = None) -> None:
        self.ratio = _ratio("topk", "ratio", ratio)
        if method not in _METHODS:
            raise ValueError(f"topk: method must be one of {_METHODS}, got {method!r}")
        self.method = method
        self._init_values(values, values_params)

    def config(self) -> dict:
        return {"ratio": self.ratio, "method": self.method, **self._values_config()}

    def _select(self, xf: np.ndarray, ctx: CodecContext) -> np.ndarray:
        n, k = xf.size, _k(self.ratio, xf.size)
        if k == n:
            return np.arange(n)
        if self.method == "exact":
            top = torch.topk(torch.from_numpy(xf).abs(), k, sorted=False).indices.numpy()
            return np.sort(top)
        m = min(n, max(math.ceil(0.01 * n), math.ceil(2 / self.ratio)))
        sample = np.abs(xf[:: max(1, n // m)])
        kk = min(sample.size, max(1, math.ceil(self.ratio * sample.size)))
        thr = float(np.partition(sample, sample.size - kk)[sample.size - kk])
        idx = _above(xf, thr)
        # DGC's adaptation: lower the threshold while far too few pass (at most 10 times).
        for _ in range(10):
            if idx.size >= 0.8 * k or thr <= 0:
                break
            thr *= 0.8
            idx = _above(xf, thr)
        return _largest(xf, idx, k) if idx.size > 1.3 * k else idx

    def wire_bytes(self, shape: tuple[int, ...]) -> int | None:
        if self.method != "exact":
            return None
        n = math.prod(shape)
        k = _k(self.ratio, n)
        vb = self.values.wire_bytes((k,))
        return None if vb is None else ef_nbytes(k, n) + vb


@register_codec("threshold")
class Threshold(_Sparse):
    """Aji & Heafield's gradient dropping: drop the `drop` fraction of smallest |x|.

    The threshold is the `drop` quantile of |x| on a random sample (1%, at least 4096 values)
    drawn from the context, so the kept count is about (1 - drop) * d.
    """

    def __init__(self, drop: float = 0.99, values: str = "identity",
                 values_params: Mapping[str, Any] | None = None) -> None:
        self.drop = _ratio("threshold", "drop", drop, open_low=False)
        self._init_values(values, values_params)

    def config(self) -> dict:
        return {"drop": self.drop, **self._values_config()}

    def _select(self, xf: np.ndarray, ctx: CodecContext) -> np.ndarray:
        n = xf.size
        if n == 0:
            return np.zeros(0, np.int64)
        m = min(n, max(4096, n // 100))
        sample = xf if m == n else xf[ctx.generator().integers(0, n, m)]
        thr = float(np.quantile(np.abs(sample), self.drop))
        idx = _above(xf, thr)
        return idx if thr > 0 else np.flatnonzero(xf)


@register_codec("randomk")
class RandomK(Codec):
    """k = ceil(ratio * d) coordinates chosen uniformly from the context seed, values scaled by
    d/k (unbiased). Wire: the values payload only, 4k bytes as float32."""

    def __init__(self, ratio: float = 0.01, values: str = "identity",
                 values_params: Mapping[str, Any] | None = None) -> None:
        self.ratio = _ratio("randomk", "ratio", ratio)
        self.values = build(values, values_params, "randomk")

    def config(self) -> dict:
        return {"ratio": self.ratio, "values": self.values.name, "values_params": self.values.config()}

    @staticmethod
    def _indices(seed: int, n: int, k: int) -> np.ndarray:
        return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        xf = flat32(x)
        n = xf.size
        k = _k(self.ratio, n)
        seed = int(ctx.generator().integers(0, 1 << 62))
        vals = xf[self._indices(seed, n, k)] * np.float32(n / k if k else 0.0)
        vp = self.values.encode(torch.from_numpy(vals), ctx)
        return self._payload(x, {"k": k, "seed": seed, **nest(_V, vp)}, vp.data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        k = param(p, "k", int, 0, n)
        seed = param(p, "seed", int, 0, (1 << 63) - 1)
        vp = unnest(p, _V, self.values, shape=(k,), dtype="float32", data=as_bytes(p))
        vals = self.values.decode(vp, ctx)
        if tuple(vals.shape) != (k,):
            raise PayloadError(f"randomk: values decode to shape {tuple(vals.shape)}, expected ({k},)")
        out = torch.zeros(n, dtype=torch.float32)
        out[torch.from_numpy(self._indices(seed, n, k))] = vals.to(torch.float32)
        return out.reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int | None:
        return self.values.wire_bytes((_k(self.ratio, math.prod(shape)),))
