"""`powersgd` and `atomo`: low-rank codecs for weight matrices (compression.md D.10, D.11).

A tensor is viewed as an n x m matrix (n = shape[0]). Where the low-rank form would not save
at least half the bytes (vectors, small matrices), the tensor is sent dense as float32
(param mode="dense"), as torch's PowerSGD hook does with min_compression_rate = 2.

powersgd wire: P (n x r) then Q (m x r), float32, 4r(n + m) bytes; decodes to P Q^T. One power
iteration per round, warm-started from the Q kept in `ctx.state.warm_start[ctx.key]` (a
`CodecState`); biased, so wrap it in `ef` for uploads.
atomo wire: the k sampled atoms' weights sigma_i / p_i, then their u_i (n each) and v_i (m
each), float32: 4k(n + m + 1) bytes, k random with E[k] = budget. Unbiased.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._buf import expect_nbytes, flat32, view

__all__ = ["Atomo", "PowerSGD"]


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 and shape[0] > 0 else 1
    return rows, n // rows


def _dense(codec: Codec, x: torch.Tensor) -> Payload:
    return codec._payload(x, {"mode": "dense", "rank": 0}, flat32(x).view(np.uint8).copy())


def _read(p: Payload, n_: int, codec: str) -> tuple[str, int]:
    mode = param(p, "mode", str)
    if mode not in ("dense", "lowrank"):
        raise PayloadError(f"{codec}: mode {mode!r} is not 'dense' or 'lowrank'")
    return mode, param(p, "rank", int, 0, n_)


def _decode_dense(p: Payload, n: int) -> torch.Tensor:
    vals = view(expect_nbytes(p, 4 * n), np.float32, n, 0).copy()
    return torch.from_numpy(vals).reshape(p.shape).to(getattr(torch, p.dtype))


def _factors(p: Payload, n: int, m: int, a: int, extra: int) -> torch.Tensor:
    """The float32 payload of `extra + a*(n+m)` values, checked finite, as a tensor."""
    total = extra + a * (n + m)
    vals = view(expect_nbytes(p, 4 * total), np.float32, total, 0)
    if not np.isfinite(vals).all():
        raise PayloadError(f"{p.codec}: factors must be finite")
    return torch.from_numpy(vals.copy())


@register_codec("powersgd")
class PowerSGD(Codec):
    """Rank-`rank` approximation P Q^T by one warm-started power iteration."""

    stateful = True

    def __init__(self, rank: int = 2) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1024:
            raise ValueError(f"powersgd: rank must be an integer in 1..1024, got {rank!r}")
        self.rank = rank

    def config(self) -> dict:
        return {"rank": self.rank}

    def _compresses(self, n: int, m: int) -> bool:
        r = min(self.rank, n, m)
        return 2 * r * (n + m) < n * m

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        n, m = _matrix_shape(tuple(x.shape))
        if not self._compresses(n, m):
            return _dense(self, x)
        r = min(self.rank, n, m)
        mat = x.detach().to(torch.float32).reshape(n, m)
        warm = getattr(ctx.state, "warm_start", None)
        q = warm.get(ctx.key) if warm is not None else None
        if q is None or tuple(q.shape) != (m, r):
            q = torch.randn(m, r, generator=ctx.torch_generator())
        p_ = torch.linalg.qr(mat @ q).Q
        q = mat.T @ p_
        if warm is not None:
            warm[ctx.key] = q.clone()
        data = torch.cat([p_.reshape(-1), q.reshape(-1)]).numpy().view(np.uint8)
        return self._payload(x, {"mode": "lowrank", "rank": r}, data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        numel = self._check(p)
        n, m = _matrix_shape(p.shape)
        mode, r = _read(p, max(1, min(n, m)), "powersgd")
        if mode == "dense":
            return _decode_dense(p, numel)
        if r < 1:
            raise PayloadError("powersgd: rank must be >= 1")
        f = _factors(p, n, m, r, 0)
        out = f[: n * r].reshape(n, r) @ f[n * r :].reshape(m, r).T
        return out.reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        n, m = _matrix_shape(shape)
        if not self._compresses(n, m):
            return 4 * n * m
        return 4 * min(self.rank, n, m) * (n + m)


def atomo_probabilities(sigma: torch.Tensor, budget: float) -> torch.Tensor:
    """Variance-optimal inclusion probabilities p_i = min(1, sigma_i / c) with sum p_i = budget
    (water-filling over the sorted spectrum), ATOMO's Theorem for spectral atoms."""
    s = sigma.to(torch.float64)
    nz = int((s > 0).sum())
    if nz <= budget:
        return (s > 0).to(torch.float64)
    srt, _ = torch.sort(s, descending=True)
    tail = torch.flip(torch.cumsum(torch.flip(srt, [0]), 0), [0])  # tail[j] = sum_{i>=j}
    j = torch.arange(srt.numel(), dtype=torch.float64)
    room = budget - j
    c = torch.where(room > 0, tail / room.clamp(min=1e-300), torch.full_like(tail, math.inf))
    ok = (srt <= c) & (room > 0)
    first = int(torch.nonzero(ok)[0]) if bool(ok.any()) else 0
    return torch.clamp(s / c[first], max=1.0)


@register_codec("atomo")
class Atomo(Codec):
    """Spectral ATOMO: sample rank-1 SVD atoms with variance-optimal probabilities, expected
    count `budget`, each reweighted by 1/p so the estimate is unbiased."""

    def __init__(self, budget: int = 2) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= 1024:
            raise ValueError(f"atomo: budget must be an integer in 1..1024, got {budget!r}")
        self.budget = budget

    def config(self) -> dict:
        return {"budget": self.budget}

    def _compresses(self, n: int, m: int) -> bool:
        return 2 * min(self.budget, n, m) * (n + m + 1) < n * m

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        n, m = _matrix_shape(tuple(x.shape))
        if not self._compresses(n, m):
            return _dense(self, x)
        mat = x.detach().to(torch.float32).reshape(n, m)
        u, sigma, vh = torch.linalg.svd(mat, full_matrices=False)
        prob = atomo_probabilities(sigma, self.budget)
        draw = torch.rand(prob.numel(), generator=ctx.torch_generator(), dtype=torch.float64)
        keep = torch.nonzero(draw < prob).reshape(-1)
        w = (sigma[keep].to(torch.float64) / prob[keep]).to(torch.float32)
        data = torch.cat([w, u[:, keep].T.reshape(-1), vh[keep].reshape(-1)])
        return self._payload(x, {"mode": "lowrank", "rank": int(keep.numel())}, data.numpy().view(np.uint8))

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        numel = self._check(p)
        n, m = _matrix_shape(p.shape)
        mode, k = _read(p, max(1, min(n, m)), "atomo")
        if mode == "dense":
            return _decode_dense(p, numel)
        f = _factors(p, n, m, k, k)
        w, us, vs = f[:k], f[k : k + k * n].reshape(k, n), f[k + k * n :].reshape(k, m)
        out = (us.T * w) @ vs
        return out.reshape(p.shape).to(getattr(torch, p.dtype))

    def max_wire_bytes(self, shape: tuple[int, ...]) -> int:
        n, m = _matrix_shape(shape)
        return max(4 * n * m, 4 * min(n, m) * (n + m + 1))
