"""P2U progressive model distribution: the global model in precision stages (compression.md C).

Stage 0 is a b0-bit affine quantization per block of `block` values (float32 min and step per
block, then the codes). Stage k >= 1 refines it without new metadata: round to nearest leaves
the residual inside [-step/2, step/2], so that interval is split into 2**b_k cells
(step_k = step_{k-1} / 2**b_k) and the cell index is sent. After K stages the error is at most
step_K / 2 and the bytes are those of one-shot quantization at sum(b_k) bits plus stage 0's
metadata. An optional exact final stage sends the XOR of the float32 bit patterns of the
original and the stage-K reconstruction, zstd-compressed: the client then holds the model
bit for bit.

Pure API (the gRPC download streams one `Payload` per stage and tensor):
    cfg = P2UConfig(stage_bits=(4, 4, 8), exact_final=False)
    stages = encode_stages(t, cfg=cfg)          # list[Payload], codec "p2u.stage"
    approx = decode_stages(stages[:k])          # from the first k >= 1 stages
    sizes = stage_bytes(cfg=cfg, shape=t.shape) # bytes per stage (None: data-dependent)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import zstandard

from .codecs._bits import pack, packed_nbytes, unpack
from .codecs._buf import CHUNK, as_bytes, chunks, expect_nbytes, flat32, view
from .codecs.uniform import _group_minmax
from .payload import Payload, PayloadError, check_shape, param

__all__ = ["STAGE_CODEC", "P2UConfig", "decode_stages", "encode_stages", "stage_bytes"]

STAGE_CODEC = "p2u.stage"
_VERSION = 1
# float32 has a 24-bit significand: refining past 24 bits in all cannot change a float32 value.
_MAX_TOTAL_BITS = 24


@dataclass(frozen=True)
class P2UConfig:
    """How a model is split into precision stages.

    Attributes:
        stage_bits: bits sent per value at each stage, each in 1..8, at most 24 in all.
        exact_final: append a lossless stage that makes the result bit-exact.
        block: values per stage-0 block (one float32 min and step each).
        start_after: the stage after which a client starts training (0-based; -1 = the last
            stage). A tuple gives one value per round, the last repeating.
    """

    stage_bits: tuple[int, ...] = (4, 4, 8)
    exact_final: bool = False
    block: int = 4096
    start_after: int | tuple[int, ...] = -1

    def __post_init__(self) -> None:
        bits = tuple(self.stage_bits) if isinstance(self.stage_bits, (list, tuple)) else None
        if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8 for b in bits):
            raise ValueError(f"p2u: stage_bits must be a non-empty list of integers in 1..8, got {self.stage_bits!r}")
        if sum(bits) > _MAX_TOTAL_BITS:
            raise ValueError(f"p2u: stage_bits sum to {sum(bits)}; float32 needs at most {_MAX_TOTAL_BITS}, drop a stage")
        object.__setattr__(self, "stage_bits", bits)
        if not isinstance(self.exact_final, bool):
            raise ValueError(f"p2u: exact_final must be true or false, got {self.exact_final!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 1 <= self.block <= 1 << 30:
            raise ValueError(f"p2u: block must be a positive integer, got {self.block!r}")
        starts = self.start_after if isinstance(self.start_after, (list, tuple)) else (self.start_after,)
        if not starts or any(isinstance(s, bool) or not isinstance(s, int) or not -1 <= s < self.num_stages for s in starts):
            raise ValueError(
                f"p2u: start_after must be a stage index in -1..{self.num_stages - 1} (or a list of them "
                f"per round), got {self.start_after!r}"
            )
        object.__setattr__(self, "start_after", tuple(starts) if isinstance(self.start_after, (list, tuple)) else starts[0])

    @property
    def num_stages(self) -> int:
        return len(self.stage_bits) + int(self.exact_final)

    def start_stage(self, round: int) -> int:
        """0-based index of the stage after which clients start training in `round`."""
        s = self.start_after
        if isinstance(s, tuple):
            s = s[min(max(round, 0), len(s) - 1)]
        return self.num_stages - 1 if s < 0 else s


def stage_bytes(*, cfg: P2UConfig, shape: Sequence[int]) -> list[int | None]:
    """Payload bytes of each stage for a tensor of `shape` (None for the exact stage, whose
    size depends on the data; 4 bytes per value bounds it loosely)."""
    n = math.prod(shape)
    groups = -(-n // max(1, min(cfg.block, n))) if n else 0
    sizes: list[int | None] = [8 * groups + packed_nbytes(n, cfg.stage_bits[0])]
    sizes += [packed_nbytes(n, b) for b in cfg.stage_bits[1:]]
    if cfg.exact_final:
        sizes.append(None)
    return sizes


def _stage_payload(x_dtype: str, shape, params: dict, data: np.ndarray) -> Payload:
    return Payload(STAGE_CODEC, _VERSION, x_dtype, tuple(shape), params, data)


def encode_stages(t: torch.Tensor, *, cfg: P2UConfig = P2UConfig()) -> list[Payload]:
    """Split `t` into `cfg.num_stages` stage payloads (codec "p2u.stage")."""
    dtype = str(t.dtype).removeprefix("torch.")
    shape = tuple(int(s) for s in t.shape)
    wf = flat32(t)
    n = wf.size
    block = max(1, min(cfg.block, n))
    common = {"block": block, "stages": cfg.num_stages}
    lo, hi = _group_minmax(wf, block)
    b0 = cfg.stage_bits[0]
    step0 = ((hi - lo) * np.float32(1.0 / ((1 << b0) - 1))).astype(np.float32)
    sizes = stage_bytes(cfg=cfg, shape=(n,))
    bufs = [np.empty(s, np.uint8) for s in sizes[: len(cfg.stage_bits)]]
    groups = lo.size
    bufs[0][: 8 * groups] = np.concatenate([lo.astype(np.float32), step0]).view(np.uint8)
    streams = [_Stream(bufs[0][8 * groups :], b0, n, block)]
    streams += [_Stream(b, bits, n, block) for b, bits in zip(bufs[1:], cfg.stage_bits[1:])]
    approx = _encode(wf, lo, step0, block, streams, cfg.exact_final)
    out, prior = [], 0
    for k, (b, bits) in enumerate(zip(bufs, cfg.stage_bits)):
        out.append(_stage_payload(dtype, shape, {**common, "stage": k, "bits": bits, "prior_bits": prior}, b))
        prior += bits
    if cfg.exact_final:
        diff = wf.view(np.uint32) ^ approx.view(np.uint32)
        frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(diff.tobytes())
        out.append(_stage_payload(dtype, shape, {**common, "stage": len(cfg.stage_bits), "bits": 0,
                                                 "prior_bits": prior, "exact": 1},
                                  np.frombuffer(frame, np.uint8)))
    return out


class _Stream:
    """One stage's packed codes, written or read piece by piece (`chunks` pieces) where every
    piece starts on a whole byte, else through one full-length code array."""

    def __init__(self, data: np.ndarray, bits: int, n: int, block: int) -> None:
        self.data, self.bits, self.n = data, bits, n
        self.piecewise = block % 8 == 0 or block >= n  # pieces start at multiples of block (and CHUNK)
        self.codes: np.ndarray | None = None

    def put(self, s: int, e: int, codes: np.ndarray) -> None:
        if self.piecewise:
            self.data[s * self.bits // 8 : (e * self.bits + 7) // 8] = pack(codes, self.bits)
            return
        if self.codes is None:
            self.codes = np.empty(self.n, np.uint8)
        self.codes[s:e] = codes

    def flush(self) -> None:
        if self.codes is not None:
            self.data[:] = pack(self.codes, self.bits)

    def get(self, s: int, e: int) -> np.ndarray:
        if self.piecewise:
            return unpack(self.data[s * self.bits // 8 : (e * self.bits + 7) // 8], self.bits, e - s)
        if self.codes is None:
            self.codes = unpack(self.data, self.bits, self.n)
        return self.codes[s:e]


# The stages in closed form. With u = (w - min) / step0 (per block), stage 0 sends
# c0 = rint(u); the refinements split the residual cell [c0 - 1/2, c0 + 1/2] into 2**R cells
# (R = the refinement bits in all), so their codes are the bit fields, most significant first,
# of one fixed-point number M = min(floor((u - c0 + 1/2) * 2**R), 2**R - 1). After the first k
# stages (P of the R bits, M_P = M's top P bits) the value is
#     min + step0 * (c0 - 1/2 + (M_P + 1/2) / 2**P)        (min + step0 * c0 after stage 0),
# which is what stage-by-stage refinement (step_k = step_{k-1} / 2**b_k, codes
# floor((w - approx + step_{k-1} / 2) / step_k)) gives. Encoder and decoder evaluate this one
# float64 expression in the same order, in cache-sized pieces packed straight into the stage
# buffers (compression.md E.5), so the exact stage's XOR sees the same float32 bits on both
# sides. Bounds: w >= min makes u >= 0 and u - c0 >= -1/2 exactly, so only the top needs a clamp.


def _encode(wf: np.ndarray, lo: np.ndarray, step0: np.ndarray, block: int, streams: list[_Stream],
            exact: bool) -> np.ndarray | None:
    """Write every stage's codes; return the float32 reconstruction after all stages if `exact`."""
    n = wf.size
    lo64, st64 = lo.astype(np.float64), step0.astype(np.float64)
    dead = ~(st64 > 0)  # zero or non-finite step: every code 0, as the value is the block min
    approx = np.empty(n, np.float32) if exact else None
    size = min(CHUNK, max(n, 1))
    u_buf, c_buf = np.empty(size, np.float64), np.empty(size, np.float64)
    m_buf = np.empty(size, np.uint32)
    b0, fine = streams[0].bits, streams[1:]
    r = sum(s.bits for s in fine)
    top0, scale = float((1 << b0) - 1), float(1 << r)
    for s, e, g0, rows, w in chunks(n, block):
        u, c = u_buf[: e - s].reshape(rows, w), c_buf[: e - s].reshape(rows, w)
        l, st, d = lo64[g0 : g0 + rows, None], st64[g0 : g0 + rows, None], dead[g0 : g0 + rows]
        np.subtract(wf[s:e].reshape(rows, w), l, out=u)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(u, st, out=u)
        if d.any():
            u[d] = 0.0
        np.rint(u, out=c)
        np.minimum(c, top0, out=c)
        streams[0].put(s, e, c.astype(np.uint8).reshape(-1))
        if r:
            np.subtract(u, c, out=u)
            u += 0.5
            u *= scale
            np.floor(u, out=u)
            np.minimum(u, scale - 1, out=u)
            if d.any():
                u[d] = 0.0
            m = m_buf[: e - s]
            np.copyto(m.reshape(rows, w), u, casting="unsafe")
            shift = r
            for st_ in fine:
                shift -= st_.bits
                st_.put(s, e, ((m >> np.uint32(shift)) & np.uint32((1 << st_.bits) - 1)).astype(np.uint8))
        if exact:
            _value(c, u if r else None, r, l, st, approx[s:e].reshape(rows, w))
    for st_ in streams:
        st_.flush()
    return approx


def _value(c0: np.ndarray, m: np.ndarray | None, p: int, lo: np.ndarray, step: np.ndarray, out: np.ndarray) -> None:
    """out = lo + step * (c0 - 1/2 + (m + 1/2) / 2**p), or lo + step * c0 without m; float64
    arrays c0 and m (m is overwritten)."""
    if m is None:
        np.add(lo, step * c0, out=out, casting="unsafe")
        return
    m += 0.5
    m *= 1.0 / (1 << p)
    m += c0
    m -= 0.5
    m *= step
    np.add(lo, m, out=out, casting="unsafe")


def decode_stages(payloads: Sequence[Payload]) -> torch.Tensor:
    """Reconstruct a tensor from its first k >= 1 stage payloads, in order.

    Raises:
        PayloadError: no stages, stages out of order or from different tensors, malformed
            bytes, or a reconstruction that is not finite.
    """
    if not payloads:
        raise PayloadError("p2u: at least one stage is needed")
    first = payloads[0]
    n = _check_stage(first, 0, None)
    block = param(first, "block", int, 1, max(n, 1))
    groups = -(-n // block) if n else 0
    b0 = param(first, "bits", int, 1, 8)
    mv = expect_nbytes(first, 8 * groups + packed_nbytes(n, b0))
    meta = view(mv, np.float32, 2 * groups, 0)
    if not np.isfinite(meta).all() or (meta[groups:] < 0).any():
        raise PayloadError("p2u: stage 0 block min and step must be finite, steps non-negative")
    streams = [_Stream(view(mv, np.uint8, -1, 8 * groups), b0, n, block)]
    prior = b0
    for k, p in enumerate(payloads[1:], start=1):
        _check_stage(p, k, first)
        if param(p, "prior_bits", int, 0, _MAX_TOTAL_BITS) != prior:
            raise PayloadError(f"p2u: stage {k} follows {param(p, 'prior_bits', int)} bits, not {prior}")
        if p.params.get("exact") == 1:
            if k != len(payloads) - 1 or k != param(first, "stages", int) - 1:
                raise PayloadError("p2u: the exact stage must be the last one")
            return _exact(p, _decode_values(streams, meta, groups, block, n), n)
        b = param(p, "bits", int, 1, _MAX_TOTAL_BITS - prior)
        streams.append(_Stream(view(expect_nbytes(p, packed_nbytes(n, b)), np.uint8, -1, 0), b, n, block))
        prior += b
    return _finish(_decode_values(streams, meta, groups, block, n), first)


def _decode_values(streams: list[_Stream], meta: np.ndarray, groups: int, block: int, n: int) -> np.ndarray:
    """float32 values from the stages' codes (see `_value`)."""
    lo64, st64 = meta[:groups].astype(np.float64), meta[groups:].astype(np.float64)
    fine = streams[1:]
    p = sum(s.bits for s in fine)
    out = np.empty(n, np.float32)
    size = min(CHUNK, max(n, 1))
    c_buf = np.empty(size, np.float64)
    m_buf = np.empty(size, np.float64) if fine else None
    for s, e, g0, rows, w in chunks(n, block):
        c = c_buf[: e - s].reshape(rows, w)
        np.copyto(c, streams[0].get(s, e).reshape(rows, w), casting="unsafe")
        m = None
        if fine:
            m = m_buf[: e - s].reshape(rows, w)
            np.copyto(m, fine[0].get(s, e).reshape(rows, w), casting="unsafe")
            for st_ in fine[1:]:
                m *= float(1 << st_.bits)
                m += st_.get(s, e).reshape(rows, w)
        _value(c, m, p, lo64[g0 : g0 + rows, None], st64[g0 : g0 + rows, None], out[s:e].reshape(rows, w))
    return out


def _check_stage(p: Payload, k: int, first: Payload | None) -> int:
    if p.codec != STAGE_CODEC or p.version != _VERSION:
        raise PayloadError(f"p2u: stage {k} is {p.codec!r} v{p.version}, expected {STAGE_CODEC!r} v{_VERSION}")
    n = check_shape(p)
    if param(p, "stage", int, 0, 64) != k:
        raise PayloadError(f"p2u: got stage {p.params['stage']} where stage {k} belongs")
    if first is not None:
        for attr in ("shape", "dtype"):
            if getattr(p, attr) != getattr(first, attr):
                raise PayloadError(f"p2u: stage {k} has another {attr} than stage 0")
        if p.params.get("block") != first.params.get("block") or p.params.get("stages") != first.params.get("stages"):
            raise PayloadError(f"p2u: stage {k} has another block or stage count than stage 0")
    param(p, "stages", int, k + 1, 64)
    return n


def _exact(p: Payload, approx: np.ndarray, n: int) -> torch.Tensor:
    frame = as_bytes(p)
    try:
        if zstandard.frame_content_size(frame) != 4 * n:
            raise PayloadError(f"p2u: the exact stage must declare {4 * n} bytes")
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=4 * n)
    except zstandard.ZstdError as e:
        raise PayloadError(f"p2u: corrupt exact stage: {e}") from None
    if len(raw) != 4 * n:
        raise PayloadError("p2u: the exact stage holds the wrong number of bytes")
    bits = np.frombuffer(raw, np.uint32) ^ approx.view(np.uint32)
    return _finish(bits.view(np.float32), p)


def _finish(out: np.ndarray, p: Payload) -> torch.Tensor:
    if not np.isfinite(out).all():
        raise PayloadError("p2u: stages decode to NaN or infinity")
    return torch.from_numpy(out).reshape(p.shape).to(getattr(torch, p.dtype))
