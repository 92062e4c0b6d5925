"""Hostile payloads: every mutation of a valid payload either decodes to a finite tensor of the
declared shape or raises PayloadError, never another exception, NaN or a huge allocation."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedray.compression import CodecContext, Payload, PayloadError, decode_checked, get_codec
from fedray.compression.payload import MAX_TENSOR_ELEMENTS

CODECS = [
    ("identity", {}), ("int8", {}), ("fp16", {}), ("bf16", {}), ("uniform", {"bits": 3}),
    ("uniform", {"bits": 4, "mode": "symmetric", "granularity": "block", "block": 8}), ("int4", {}),
    ("qsgd", {"levels": 3, "bucket": 16}), ("qsgd", {"levels": 300}), ("terngrad", {}), ("sign", {}),
    ("scaled_sign", {}), ("topk", {"ratio": 0.2}), ("threshold", {"drop": 0.8}), ("randomk", {"ratio": 0.3}),
    ("powersgd", {"rank": 1}), ("atomo", {"budget": 1}), ("blockwise8", {"block": 16}), ("nf4", {}),
    ("zstd", {"inner": "int8"}), ("ef", {"inner": "scaled_sign"}),
    ("p2u", {"stage_bits": [3, 2]}), ("p2u", {"stage_bits": [2], "exact_final": True}),
    ("pipeline", {"stages": ["ef", {"codec": "topk", "ratio": 0.2}, {"codec": "uniform", "bits": 2}, "zstd"]}),
]

X = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))


def _valid(name, params):
    codec = get_codec(name, **params)
    return codec, codec.encode(X, CodecContext(seed=5, key="w"))


def _with(p: Payload, **kw) -> Payload:
    f = dict(codec=p.codec, version=p.version, dtype=p.dtype, shape=p.shape, params=dict(p.params), data=p.data)
    f.update(kw)
    return Payload(**f)


def _decode_safely(codec, p: Payload) -> None:
    """Fresh decode and decode into a (poisoned) buffer agree: both refuse, or both give the same
    finite values of the declared shape."""
    buf = None
    if all(isinstance(s, int) and s >= 0 for s in p.shape) and math.prod(p.shape) <= 1 << 20:
        buf = torch.full((math.prod(p.shape),), math.nan)
    try:
        out = decode_checked(codec, p)
    except PayloadError:
        if buf is not None:
            with pytest.raises(PayloadError):
                decode_checked(codec, p, out=buf)
            with pytest.raises(PayloadError):
                codec.fold(p)  # the service's path refuses exactly what decoding refuses
            with pytest.raises(PayloadError):
                codec.folder(_with(p, data=b""))(p.data)  # and so does its per-metadata plan
        return
    assert tuple(out.shape) == tuple(p.shape)
    assert bool(torch.isfinite(out).all())
    if buf is not None:
        assert torch.equal(decode_checked(codec, p, out=buf).to(out.dtype), out)
        acc = torch.zeros(buf.numel(), dtype=torch.float64)
        codec.fold(p)(acc, 1.0)
        assert bool(torch.isfinite(acc).all())
        planned = torch.zeros_like(acc)
        codec.folder(_with(p, data=b""))(p.data)(planned, 1.0)
        assert torch.equal(planned, acc)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 64), st.integers(0, 255)),
    st.tuples(st.just("nan"), st.integers(0, 10**6), st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -1.0])),
    st.tuples(st.just("param"), st.integers(0, 10**6),
              st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=8),
                        st.sampled_from([0, 1, -1, 2**31, 2**62]))),
    st.tuples(st.just("drop_param"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("shape"), st.integers(0, 4), st.sampled_from([0, 1, 7, 4096, 2**40, -3])),
    st.tuples(st.just("meta"), st.integers(0, 3), st.sampled_from(["nope", "float16", "int8", ""])),
)


def _mutate(p: Payload, kind: str, a, b) -> Payload:
    data = bytearray(memoryview(p.data).cast("B"))
    if kind == "flip":
        if data:
            data[a % len(data)] ^= 1 << b
        return _with(p, data=bytes(data))
    if kind == "truncate":
        return _with(p, data=bytes(data[: a % (len(data) + 1)]))
    if kind == "extend":
        return _with(p, data=bytes(data) + bytes([b]) * a)
    if kind == "nan":
        if len(data) >= 4:
            off = (a % (len(data) // 4)) * 4
            data[off : off + 4] = struct.pack("<f", b)
        return _with(p, data=bytes(data))
    if kind in ("param", "drop_param"):
        keys = sorted(p.params)
        if not keys:
            return _with(p, params={"bits": b})
        params = dict(p.params)
        key = keys[a % len(keys)]
        if kind == "drop_param":
            del params[key]
        else:
            params[key] = b
        return _with(p, params=params)
    if kind == "shape":
        shape = list(p.shape) + [1]
        shape[a % len(shape)] = b
        return _with(p, shape=tuple(shape))
    return _with(p, **{("codec", "dtype", "codec", "dtype")[a]: b})


@pytest.mark.parametrize("name,params", CODECS, ids=lambda v: v if isinstance(v, str) else "")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_payloads_raise_only_payload_error(name, params, muts):
    codec, p = _valid(name, params)
    for m in muts:
        p = _mutate(p, *m)
    _decode_safely(codec, p)


@pytest.mark.parametrize("name,params", CODECS, ids=lambda v: v if isinstance(v, str) else "")
def test_targeted_hostile_payloads(name, params):
    codec, p = _valid(name, params)
    assert bool(torch.isfinite(decode_checked(codec, p)).all())
    # Shapes over the cap are refused before anything is allocated. (Sparse codecs may
    # legitimately declare a big tensor with few bytes; the cap bounds what that costs.)
    for shape in ((MAX_TENSOR_ELEMENTS + 1,), (2**30, 2**30), (1 << 31, 2), (2**62, 4, 4)):
        with pytest.raises(PayloadError):
            decode_checked(codec, _with(p, shape=shape))
    # Every prefix of the bytes, and NaN in every float32 slot.
    data = bytes(memoryview(p.data).cast("B"))
    for cut in range(0, len(data), max(1, len(data) // 40)):
        _decode_safely(codec, _with(p, data=data[:cut]))
    for off in range(0, len(data) - 3, 4):
        for bad in (math.nan, math.inf, -1.0):
            _decode_safely(codec, _with(p, data=data[:off] + struct.pack("<f", bad) + data[off + 4 :]))
    # Every integer param set to extremes; every param removed.
    for key, v in p.params.items():
        for bad in (-1, 0, 2**31, 2**63 - 1, 1.5, "x", math.nan):
            _decode_safely(codec, _with(p, params={**p.params, key: bad}))
        _decode_safely(codec, _with(p, params={k: w for k, w in p.params.items() if k != key}))
    with pytest.raises(PayloadError):
        decode_checked(codec, _with(p, codec="something_else"))
    with pytest.raises(PayloadError):
        decode_checked(codec, _with(p, version=p.version + 1))


def test_sparse_index_tampering():
    codec = get_codec("topk", ratio=0.5)
    p = codec.encode(torch.randn(64))
    for k in (0, 1, 31, 33, 64, 65, 2**31):
        _decode_safely(codec, _with(p, params={**p.params, "k": k}))
    # k claims the whole tensor with a short stream: refused on size, not by allocating.
    with pytest.raises(PayloadError):
        decode_checked(codec, _with(p, shape=(1 << 31,), params={**p.params, "k": 1 << 31}))


def test_zstd_bomb_is_refused():
    import zstandard

    codec = get_codec("zstd", inner="int8")
    p = codec.encode(torch.randn(100))
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 24))
    with pytest.raises(PayloadError):
        decode_checked(codec, _with(p, data=bomb))
    with pytest.raises(PayloadError):
        decode_checked(codec, _with(p, data=bomb, params={**p.params, "raw": 1 << 24}))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 104)
    _decode_safely(codec, _with(p, data=no_size))
