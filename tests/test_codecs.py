"""Codec unit tests: round trips, error bounds, exact byte counts against the formulas of
compression.md (written out here independently of the codecs), seeded determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedray.compression import CodecContext, Payload, PayloadError, available_codecs, decode_checked, get_codec

SETTINGS = settings(max_examples=15, deadline=None)

REGISTRY = ["atomo", "bf16", "blockwise8", "ef", "fp16", "identity", "int4", "int8", "nf4", "p2u",
            "pipeline", "powersgd", "qsgd", "randomk", "scaled_sign", "sign", "terngrad", "threshold",
            "topk", "uniform", "zstd"]


def _ceil8(bits: int) -> int:
    return -(-bits // 8)


def _groups(d: int, block: int) -> int:
    return -(-d // max(1, min(block, d))) if d else 0


# Wire bytes by the formulas of compression.md sections 0 and D (d values; padding to whole bytes).
FORMULAS = {
    ("fp16", ()): lambda d: 2 * d,
    ("bf16", ()): lambda d: 2 * d,
    ("int8", ()): lambda d: d + 4,
    ("uniform", (("bits", 8),)): lambda d: d + 8 * (d > 0),              # b*d + 64
    ("uniform", (("bits", 3), ("mode", "symmetric"))): lambda d: _ceil8(3 * d) + 4 * (d > 0),
    ("uniform", (("bits", 4), ("granularity", "block"), ("block", 128))): lambda d: _ceil8(4 * d) + 8 * _groups(d, 128),
    ("int4", ()): lambda d: _ceil8(4 * d) + 4 * _groups(d, 64),
    ("qsgd", (("levels", 7),)): lambda d: _ceil8(d * (1 + 3)) + 4 * _groups(d, 512),  # d(1+ceil(log2(s+1))) + 32/bucket
    ("qsgd", (("levels", 1), ("bucket", 10**9))): lambda d: _ceil8(2 * d) + 4 * (d > 0),
    ("terngrad", ()): lambda d: _ceil8(2 * d) + 4,                      # 2d + 32
    ("sign", ()): lambda d: _ceil8(d),                                 # d
    ("scaled_sign", ()): lambda d: _ceil8(d) + 4,                      # d + 32
    ("blockwise8", ()): lambda d: d + 4 * _groups(d, 4096),            # 8d + 32 ceil(d/4096)
    ("nf4", ()): lambda d: _ceil8(4 * d) + 4 * _groups(d, 64),          # 4d + 32 ceil(d/64)
    ("randomk", (("ratio", 0.1),)): lambda d: 4 * min(d, max(1, math.ceil(0.1 * d))) if d else 0,  # 32k
}


def _params(key):
    return dict(key[1])


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
shapes = st.one_of(st.tuples(st.integers(0, 300)), st.tuples(st.integers(1, 20), st.integers(1, 30)))


def tensors():
    return shapes.flatmap(lambda s: arrays(np.float32, s, elements=finite)).map(torch.from_numpy)


def test_registry_has_every_codec():
    assert set(REGISTRY) <= set(available_codecs())


@pytest.mark.parametrize("key", list(FORMULAS), ids=lambda k: k[0] + str(dict(k[1])))
@SETTINGS
@given(x=tensors())
def test_bytes_match_formula(key, x):
    codec = get_codec(key[0], **_params(key))
    p = codec.encode(x, CodecContext(seed=3, key="t"))
    d = x.numel()
    assert p.nbytes == FORMULAS[key](d) == codec.wire_bytes(tuple(x.shape))
    y = decode_checked(codec, p)
    assert y.shape == x.shape and y.dtype == x.dtype


ALL = [
    ("identity", {}), ("int8", {"granularity": "channel"}), ("fp16", {}), ("bf16", {}),
    ("uniform", {"bits": 1, "mode": "symmetric"}), ("uniform", {"bits": 5, "granularity": "channel"}),
    ("uniform", {"bits": 2, "granularity": "block", "block": 7, "rounding": "stochastic"}),
    ("int4", {}), ("qsgd", {"levels": 255, "bucket": 64}), ("terngrad", {}), ("sign", {}),
    ("scaled_sign", {}), ("topk", {"ratio": 0.1}), ("topk", {"ratio": 0.05, "method": "sampled"}),
    ("threshold", {"drop": 0.9}), ("randomk", {"ratio": 0.2}), ("powersgd", {"rank": 1}),
    ("atomo", {"budget": 2}), ("blockwise8", {}), ("nf4", {}), ("zstd", {"inner": "qsgd", "level": 1}),
    ("ef", {"inner": "sign"}), ("p2u", {}), ("p2u", {"stage_bits": [2, 3], "exact_final": True}),
    ("pipeline", {"stages": [{"codec": "topk", "ratio": 0.1}, {"codec": "uniform", "bits": 4}, "zstd"]}),
]


@pytest.mark.parametrize("name,params", ALL, ids=lambda v: v if isinstance(v, str) else "")
@SETTINGS
@given(x=tensors(), seed=st.integers(0, 2**32))
def test_round_trip_and_determinism(name, params, x, seed):
    codec = get_codec(name, **params)
    ctx = CodecContext(seed=seed, key="layer.weight")
    p1, p2 = codec.encode(x, ctx), codec.encode(x, ctx)
    assert bytes(memoryview(p1.data)) == bytes(memoryview(p2.data)) and p1.params == p2.params
    assert all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in p1.params.values())
    exact = codec.wire_bytes(tuple(x.shape))
    if exact is not None:
        assert p1.nbytes == exact
    y = decode_checked(codec, p1)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    # Codecs restored bit-exact or nearly so:
    if name in ("identity",) or (name == "p2u" and params.get("exact_final")):
        assert torch.equal(y, x)


def _step_bound(x: torch.Tensor, bits: int, mode: str) -> float:
    rng = float(x.max() - x.min()) if mode == "affine" else 2 * float(x.abs().max())
    levels = 2**bits if mode == "affine" or bits == 1 else 2**bits - 1
    return rng / (levels - 1)


@SETTINGS
@given(x=tensors(), bits=st.integers(1, 8), mode=st.sampled_from(["affine", "symmetric"]),
       rounding=st.sampled_from(["nearest", "stochastic"]))
def test_uniform_error_bound(x, bits, mode, rounding):
    codec = get_codec("uniform", bits=bits, mode=mode, rounding=rounding)
    y = decode_checked(codec, codec.encode(x, CodecContext(seed=1)))
    if x.numel():
        step = _step_bound(x, bits, mode)
        slack = 1e-5 * float(x.abs().max()) + 1e-30
        limit = step / 2 if rounding == "nearest" else step
        assert float((y - x).abs().max()) <= limit + slack
        if mode == "symmetric" and bits > 1:
            assert bool((y[x == 0] == 0).all())  # zero is exact


@SETTINGS
@given(x=tensors(), block=st.sampled_from([1, 3, 64, 1000]))
def test_blockwise_error_bounds(x, block):
    for name, table in (("nf4", None), ("int4", None), ("blockwise8", None)):
        codec = get_codec(name, block=block)
        y = decode_checked(codec, codec.encode(x))
        if x.numel():
            absmax = float(x.abs().max())
            gap = {"nf4": 0.5 * 0.3039, "int4": 1 / 14, "blockwise8": 0.5 * 0.0141}[name]
            assert float((y - x).abs().max()) <= gap * absmax * 1.0001 + 1e-30


@SETTINGS
@given(x=tensors())
def test_casts_are_close(x):
    for name, rel in (("fp16", 2**-11), ("bf16", 2**-8)):
        codec = get_codec(name)
        y = decode_checked(codec, codec.encode(x))
        tiny = 6.2e-5 if name == "fp16" else 1e-38
        assert bool(((y - x).abs() <= rel * x.abs() + tiny).all())


@SETTINGS
@given(x=tensors(), ratio=st.floats(0.01, 1.0))
def test_topk_keeps_the_largest(x, ratio):
    codec = get_codec("topk", ratio=ratio)
    y = decode_checked(codec, codec.encode(x))
    d = x.numel()
    k = min(d, max(1, math.ceil(ratio * d))) if d else 0
    kept = y != 0
    assert int(kept.sum()) <= k
    assert torch.equal(y[kept], x[kept])
    if d and int(kept.sum()) == k and k < d:
        assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())


def test_topk_bits_near_elias_fano_formula():
    d, ratio = 1 << 20, 0.01
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    codec = get_codec("topk", ratio=ratio)
    p = codec.encode(x)
    k = math.ceil(ratio * d)
    formula = k * (32 + math.log2(d / k) + 2)  # compression.md D.7: values + delta-coded indices
    assert abs(8 * p.nbytes / formula - 1) < 0.02
    sampled = get_codec("topk", ratio=ratio, method="sampled").encode(x)
    assert 0.7 * k <= sampled.params["k"] <= 1.3 * k


def test_threshold_drops_about_99_percent():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    codec = get_codec("threshold")
    p = codec.encode(x, CodecContext(seed=2))
    assert 0.007 * x.numel() < p.params["k"] < 0.013 * x.numel()
    y = decode_checked(codec, p)
    assert torch.equal(y[y != 0], x[y != 0])


def test_powersgd_warm_start_recovers_low_rank():
    from fedray.compression.state import CodecState

    g = torch.Generator().manual_seed(0)
    m = torch.randn(64, 2, generator=g) @ torch.randn(2, 96, generator=g)
    codec, state = get_codec("powersgd", rank=2), CodecState()
    for _ in range(3):
        p = codec.encode(m, CodecContext(seed=1, key="w", state=state))
    assert p.nbytes == 4 * 2 * (64 + 96) == codec.wire_bytes((64, 96))
    assert tuple(state.warm_start["w"].shape) == (96, 2)
    assert float((decode_checked(codec, p) - m).norm() / m.norm()) < 1e-4
    vec = get_codec("powersgd").encode(torch.ones(10))
    assert vec.params["mode"] == "dense" and vec.nbytes == 40


def test_error_feedback_telescopes():
    """With memory e, sum of decoded updates = sum of inputs - final residual."""
    from fedray.compression.state import ErrorFeedbackState

    g = torch.Generator().manual_seed(0)
    codec, state = get_codec("ef", inner="topk", inner_params={"ratio": 0.05}), ErrorFeedbackState()
    total_in, total_out = torch.zeros(500), torch.zeros(500)
    for r in range(20):
        x = torch.randn(500, generator=g)
        p = codec.encode(x, CodecContext(seed=r, key="b", state=state))
        total_in += x
        total_out += decode_checked(codec, p)
    assert torch.allclose(total_out, total_in - state.residuals["b"], atol=1e-4)
    import pickle

    assert set(pickle.loads(pickle.dumps(state)).residuals) == {"b"}


def test_pipeline_composes_and_validates():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    pipe = get_codec("pipeline", stages=[{"codec": "topk", "ratio": 0.01}, {"codec": "uniform", "bits": 8}, "zstd"])
    p = pipe.encode(x)
    assert p.codec == "pipeline" and p.params["inner.codec"] == "zstd"
    assert p.params["inner.inner.v.codec"] == "uniform"
    y = decode_checked(pipe, p)
    top = get_codec("topk", ratio=0.01)
    assert torch.equal(y != 0, decode_checked(top, top.encode(x)) != 0)
    for bad in (["zstd"], ["int8", "uniform"], ["topk", "ef"], [], "int8", [{"ratio": 1}]):
        with pytest.raises(ValueError):
            get_codec("pipeline", stages=bad)
    # A payload of another composition is refused.
    other = get_codec("pipeline", stages=["int8", "zstd"])
    with pytest.raises(PayloadError):
        decode_checked(other, p)


@pytest.mark.parametrize("name,params", [
    ("uniform", {"bits": 9}), ("uniform", {"mode": "log"}), ("uniform", {"block": 0}),
    ("qsgd", {"levels": 0}), ("topk", {"ratio": 0}), ("topk", {"method": "fast"}),
    ("threshold", {"drop": 1.0}), ("randomk", {"ratio": 2}), ("powersgd", {"rank": 0}),
    ("atomo", {"budget": 0}), ("nf4", {"block": -1}), ("zstd", {"level": 99}),
    ("zstd", {"inner": "nope"}), ("ef", {"inner_params": {"x": 1}}), ("p2u", {"stage_bits": [8, 8, 8, 8]}),
    ("terngrad", {"clip": -1}), ("int4", {"bits": 8}),
])
def test_bad_params_raise_value_error(name, params):
    with pytest.raises(ValueError, match=name):
        get_codec(name, **params)


UNBIASED = [
    ("uniform", {"bits": 2, "rounding": "stochastic"}, (64,)),
    ("uniform", {"bits": 3, "mode": "symmetric", "granularity": "block", "block": 16, "rounding": "stochastic"}, (64,)),
    ("int4", {"rounding": "stochastic", "block": 32}, (64,)),
    ("qsgd", {"levels": 2, "bucket": 32}, (64,)),
    ("terngrad", {"clip": 0}, (64,)),
    ("randomk", {"ratio": 0.25}, (64,)),
    ("atomo", {"budget": 2}, (12, 16)),
]


@pytest.mark.parametrize("name,params,shape", UNBIASED, ids=lambda v: v if isinstance(v, str) else "")
def test_stochastic_codecs_are_unbiased(name, params, shape):
    """Mean of N seeded encodes vs the input: every coordinate within 5 standard errors, and
    the mean squared z-score near 1 (a chi-square check over all coordinates)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    codec = get_codec(name, **params)
    n = 600
    draws = torch.stack([decode_checked(codec, codec.encode(x, CodecContext(seed=s, key="u"))) for s in range(n)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(n)
    live = se > 1e-6
    # A coordinate can be constant over all draws when it sits within a hair of a level.
    assert float(torch.cat([(mean[~live] - x[~live]).abs(), torch.zeros(1)]).max()) < 0.01 * float(x.abs().max())
    z = ((mean - x)[live] / se[live]).abs()
    assert float(z.max()) < 5.0
    assert float((z**2).mean()) < 1.6


def test_biased_codecs_really_are():
    """Control for the test above: top-k's mean is far from the input."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(7))
    codec = get_codec("topk", ratio=0.25)
    assert float((decode_checked(codec, codec.encode(x)) - x).abs().max()) > 0.1


def test_different_seeds_differ_and_keys_matter():
    x = torch.randn(1000)
    codec = get_codec("uniform", bits=2, rounding="stochastic")
    a = bytes(memoryview(codec.encode(x, CodecContext(seed=1, key="a")).data))
    b = bytes(memoryview(codec.encode(x, CodecContext(seed=2, key="a")).data))
    c = bytes(memoryview(codec.encode(x, CodecContext(seed=1, key="b")).data))
    assert a != b and a != c


def test_encode_many_equals_encode_one_by_one():
    import torch

    from fedray.compression import available_codecs, get_codec

    xs = torch.randn(6, 12, 9)
    for name in ("int8", "identity", "fp16", "sign"):
        assert name in available_codecs()
        for c in ([get_codec(name, granularity=g) for g in ("tensor", "channel")] if name == "int8" else [get_codec(name)]):
            many = c.encode_many(xs)
            for x, p in zip(xs, many):
                q = c.encode(x)
                assert (p.codec, p.shape, dict(p.params)) == (q.codec, q.shape, dict(q.params))
                assert bytes(memoryview(p.data)) == bytes(memoryview(q.data))


@pytest.mark.parametrize("name,params", ALL, ids=lambda v: v if isinstance(v, str) else "")
@SETTINGS
@given(x=tensors(), seed=st.integers(0, 2**32))
def test_decode_into_equals_decode(name, params, x, seed):
    """`decode_into` a reused buffer (what the service does) gives exactly `decode`'s values,
    whatever the buffer held before and whatever its shape."""
    codec = get_codec(name, **params)
    ctx = CodecContext(seed=seed, key="layer.weight")
    p = codec.encode(x, ctx)
    buf = torch.full((x.numel(),), float("nan"))
    y = codec.decode_into(p, buf, ctx)
    assert tuple(y.shape) == tuple(x.shape) and y.data_ptr() == buf.data_ptr()
    assert torch.equal(y, codec.decode(p, ctx).to(torch.float32))


def test_decode_into_refuses_unfit_buffers():
    codec = get_codec("int8")
    p = codec.encode(torch.randn(4, 6))
    for bad in (torch.empty(23), torch.empty(24, dtype=torch.float64), torch.empty(6, 8)[:, ::2], np.empty(24)):
        with pytest.raises(ValueError, match="decode_into"):
            codec.decode_into(p, bad)
    assert torch.equal(codec.decode_into(p, torch.empty(2, 12)), codec.decode(p))


def _int8_oracle(x: np.ndarray, scale: np.float32) -> np.ndarray:
    inv = np.float32(1.0) / scale if scale > 0 else np.float32(0)
    return np.clip(np.rint(x * inv), -127, 127).astype(np.int8)


@SETTINGS
@given(x=arrays(np.float32, st.integers(0, 3000), elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
def test_int8_codes_equal_clamped_oracle(x):
    """The encoder skips the clamp (its docstring says why): its codes equal a clamped oracle's
    on any finite input, extremes included."""
    p = get_codec("int8").encode(torch.from_numpy(x))
    data = bytes(memoryview(p.data))
    scale = np.frombuffer(data, np.float32, count=1)[0]
    assert scale == np.float32(float(np.abs(x).max(initial=0)) / 127.0)
    assert np.array_equal(np.frombuffer(data, np.int8, offset=4), _int8_oracle(x, scale))


def test_int8_rounds_ties_to_even_per_tensor_and_per_channel():
    """Exact halves round to even, as np.rint does, on both sides of zero and per channel."""
    halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0, 127.0], np.float32)
    x = np.stack([halves, halves * 2]).astype(np.float32)  # channel 1: scale 2, the same codes
    for g, scales in (("tensor", [2.0]), ("channel", [1.0, 2.0])):
        p = get_codec("int8", granularity=g).encode(torch.from_numpy(x))
        data = bytes(memoryview(p.data))
        s = np.frombuffer(data, np.float32, count=len(scales))
        assert s.tolist() == scales
        codes = np.frombuffer(data, np.int8, offset=4 * len(scales)).reshape(2, -1)
        inv = (np.float32(1) / s.astype(np.float32))[:, None] if g == "channel" else np.float32(1) / s[0]
        np.testing.assert_array_equal(codes, np.rint(x * inv).astype(np.int8))
    assert np.rint(halves).astype(np.int8).tolist() == [0, 2, 2, 0, -2, -2, 126, -127, 127]


def test_finite_output_codecs_bound_their_scales():
    """Codecs that skip decode_checked's finiteness pass refuse scales that could overflow."""
    fmax = float(np.finfo(np.float32).max)
    int8 = get_codec("int8")
    p = int8.encode(torch.tensor([-1.0, 1.0]))
    ok = np.array([fmax / 128], np.float32).tobytes() + np.array([-128, 127], np.int8).tobytes()
    y = decode_checked(int8, Payload(p.codec, p.version, p.dtype, p.shape, p.params, ok))
    assert bool(torch.isfinite(y).all()) and float(y[0]) < -1e36
    over = np.array([fmax / 100], np.float32).tobytes() + np.array([-128, 127], np.int8).tobytes()
    with pytest.raises(PayloadError, match="scales"):
        decode_checked(int8, Payload(p.codec, p.version, p.dtype, p.shape, p.params, over))
    uni = get_codec("uniform", bits=4)  # affine: (min, step) per group
    p = uni.encode(torch.tensor([0.0, 1.0]))
    huge = np.array([-fmax / 2, fmax / 20], np.float32).tobytes() + bytes([0xFF])
    with pytest.raises(PayloadError, match="range"):
        decode_checked(uni, Payload(p.codec, p.version, p.dtype, p.shape, p.params, huge))
    assert all(get_codec(n).finite_output for n in ("int8", "int4", "uniform", "sign", "scaled_sign"))


@pytest.mark.parametrize("name,params", ALL, ids=lambda v: v if isinstance(v, str) else "")
@SETTINGS
@given(x=tensors(), seed=st.integers(0, 2**32), alpha=st.floats(0.5, 1e3))
def test_fold_adds_alpha_times_the_decoded_tensor(name, params, x, seed, alpha):
    codec = get_codec(name, **params)
    ctx = CodecContext(seed=seed, key="layer.weight")
    p = codec.encode(x, ctx)
    acc = torch.ones(x.numel(), dtype=torch.float64)
    codec.fold(p, ctx)(acc, alpha)
    y = codec.decode(p, ctx).double().reshape(-1)
    big = float(y.abs().max()) if y.numel() else 0.0
    assert torch.allclose(acc, 1 + alpha * y, rtol=0, atol=1e-6 * alpha * (big + 1))


@SETTINGS
@given(b=st.integers(1, 6), shapes=st.lists(st.sampled_from([(1,), (7,), (3, 5), (64,), (2, 3, 4)]), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_encode_batch_equals_encode_one_by_one(b, shapes, seed):
    g = torch.Generator().manual_seed(seed)
    xs = {f"t{i}": torch.randn(b, *s, generator=g) * (10.0 ** (i - 2)) for i, s in enumerate(shapes)}
    xs["t0"][0].zero_()  # an all-zero tensor: scale 0
    for codec in (get_codec("int8"), get_codec("int8", granularity="channel"), get_codec("fp16")):
        got = codec.encode_batch(xs)
        for k, x in xs.items():
            for i in range(b):
                p, q = got[k][i], codec.encode(x[i])
                assert (p.codec, p.version, p.dtype, p.shape, dict(p.params)) == (q.codec, q.version, q.dtype, q.shape, dict(q.params))
                assert bytes(memoryview(p.data)) == bytes(memoryview(q.data)), (codec.name, k, i)


def test_stochastic_codes_stay_in_range_at_the_group_extremes():
    """x = -absmax can land a few ulp below code 0 before the floor; with a draw of u = 0 that
    was code -1 (a wrapped 255 that corrupted the neighbouring nibble). Noise pinned to 0 and
    to just below 1, over many absmax values: every value decodes within one step."""
    from fedray.compression.codecs.uniform import dequantize, quantize

    class Pinned:
        def __init__(self, v):
            self.v = v

        def random(self, n, dtype, out):
            out[:n] = self.v
            return out[:n]

    rng = np.random.default_rng(0)
    for a in rng.uniform(1e-3, 1e3, 400).astype(np.float32):
        x = np.array([-a, a / 10, a / 5, a, -a / 3, 0, a, -a], np.float32)
        for v, mode in ((0.0, "symmetric"), (np.float32(1 - 2**-24), "symmetric"), (0.0, "affine")):
            data = quantize(x, bits=4, mode=mode, block=4, stochastic=True, rng=Pinned(v))
            p = Payload("uniform", 1, "float32", x.shape, {"bits": 4, "mode": mode, "block": 4}, data)
            y = dequantize(p, x.size, bits=4, mode=mode, block=4)
            step = 2 * float(np.abs(x).max()) / 14 if mode == "symmetric" else float(x.max() - x.min()) / 15
            assert float(np.abs(y - x).max()) <= step * (1 + 1e-5), (a, v, mode, x, y)


def test_narrow_dtypes_are_checked_after_the_cast():
    """A payload declared bfloat16 (or float16) whose float32 values overflow that dtype is
    refused on every path: fresh decode, decode into a float32 buffer, fold."""
    fmax = float(np.finfo(np.float32).max)
    for name in ("identity", "int8"):
        codec = get_codec(name)
        for dtype in ("bfloat16", "float16"):
            big = torch.full((4,), fmax if dtype == "bfloat16" else 1e6)
            p = codec.encode(big)
            p = Payload(p.codec, p.version, dtype, p.shape, p.params, p.data)
            for attempt in (lambda: decode_checked(codec, p), lambda: decode_checked(codec, p, out=torch.empty(4)),
                            lambda: codec.fold(p, scratch=lambda: torch.empty(4))):
                with pytest.raises(PayloadError):
                    attempt()


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_word_packing_equals_bit_planes(bits, n):
    from fedray.compression.codecs._bits import pack, unpack

    codes = np.random.default_rng(n + bits).integers(0, 1 << bits, n).astype(np.uint8)
    planes = np.unpackbits(codes.astype("<u4").reshape(-1, 1).view(np.uint8), axis=1, bitorder="little")[:, :bits]
    ref = np.packbits(planes.reshape(-1), bitorder="little")
    packed = pack(codes, bits)
    assert np.array_equal(packed, ref)
    assert np.array_equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("name", ["blockwise8", "nf4"])
def test_codebook_nearest_equals_searchsorted(name):
    codec = get_codec(name)
    mid = codec._mid
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.uniform(-1, 1, 50_000), rng.standard_normal(5000) * 1e-6, mid, np.nextafter(mid, np.inf),
                        np.nextafter(mid, -np.inf), [0.0, -0.0, 1.0, -1.0, np.nan, 1e-38, -1e-38]]).astype(np.float32)
    out = np.empty(s.size, np.uint8)
    codec._nearest(s, out)
    assert np.array_equal(out, np.searchsorted(mid, s))
