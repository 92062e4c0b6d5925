"""P2U progressive distribution: stage bytes, embedded refinement, exactness, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
import numpy as np

from fedray.compression import PayloadError, decode_checked, get_codec
from fedray.compression.p2u import P2UConfig, decode_stages, encode_stages, stage_bytes

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _tensor(n=5000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_stage_bytes_equal_one_shot_plus_stage0_metadata():
    x = _tensor(10_000)
    cfg = P2UConfig(stage_bits=(4, 4, 8), block=4096)
    stages = encode_stages(x, cfg=cfg)
    sizes = [s.nbytes for s in stages]
    assert sizes == stage_bytes(cfg=cfg, shape=x.shape)
    groups = math.ceil(10_000 / 4096)
    assert sum(sizes) == 10_000 * 16 // 8 + 8 * groups  # 16 bits per value + (min, step) per block


@settings(max_examples=20, deadline=None)
@given(x=st.integers(0, 400).flatmap(lambda n: arrays(np.float32, (n,), elements=finite)),
       bits=st.lists(st.integers(1, 8), min_size=1, max_size=4).filter(lambda b: sum(b) <= 24),
       block=st.sampled_from([1, 7, 64, 4096]))
def test_error_shrinks_by_each_stage(x, bits, block):
    t = torch.from_numpy(x)
    cfg = P2UConfig(stage_bits=tuple(bits), block=block)
    stages = encode_stages(t, cfg=cfg)
    for k in range(1, len(stages) + 1):
        y = decode_stages(stages[:k])
        assert y.shape == t.shape
        err = float((y - t).abs().max()) if t.numel() else 0.0
        # The bound, not the error itself, shrinks stage by stage: a value on stage 0's grid is
        # moved to the centre of its refinement cell. Per block the error is at most step_k / 2 with step_k = range / (2**b0 - 1) / 2**(b1+..+bk).
        rng = float(t.max() - t.min()) if t.numel() else 0.0
        bound = rng / (2 ** bits[0] - 1) / 2 ** sum(bits[1:k]) / 2
        assert err <= bound * (1 + 1e-4) + 1e-6 * (float(t.abs().max()) if t.numel() else 0.0) + 1e-30


def test_exact_final_stage_is_bit_exact():
    x = _tensor(3000) * 1e3
    stages = encode_stages(x, cfg=P2UConfig(stage_bits=(4,), exact_final=True))
    assert len(stages) == 2
    assert torch.equal(decode_stages(stages), x)
    assert not torch.equal(decode_stages(stages[:1]), x)


def test_quality_after_each_stage_matches_one_shot():
    x = _tensor(20_000, seed=3)
    stages = encode_stages(x, cfg=P2UConfig(stage_bits=(4, 4)))
    two = decode_stages(stages)
    one_shot = get_codec("uniform", bits=8, granularity="block", block=4096)
    ref = decode_checked(one_shot, one_shot.encode(x))
    rel = lambda y: float((y - x).norm() / x.norm())  # noqa: E731
    assert rel(decode_stages(stages[:1])) < 0.16  # step / sqrt(12) with the range ~ 7 sigma
    assert rel(two) < 1.2 * rel(ref)


def test_stage_order_and_mixing_are_refused():
    x, other = _tensor(100), _tensor(200, seed=1)
    a = encode_stages(x, cfg=P2UConfig(stage_bits=(2, 2, 2)))
    b = encode_stages(other, cfg=P2UConfig(stage_bits=(2, 2, 2)))
    for bad in ([], [a[1]], [a[0], a[2]], [a[0], b[1]], [a[0], a[1], a[1]]):
        with pytest.raises(PayloadError):
            decode_stages(bad)


def test_config_validation_and_start_stage():
    for bad in ({"stage_bits": ()}, {"stage_bits": (0,)}, {"stage_bits": (9,)}, {"stage_bits": (8, 8, 8, 8)},
                {"block": 0}, {"exact_final": 1}, {"start_after": 5}, {"start_after": (0, 9)}):
        with pytest.raises(ValueError, match="p2u"):
            P2UConfig(**bad)
    cfg = P2UConfig(stage_bits=(4, 4), exact_final=True, start_after=(0, 1, -1))
    assert cfg.num_stages == 3
    assert [cfg.start_stage(r) for r in range(5)] == [0, 1, 2, 2, 2]
    assert P2UConfig().start_stage(0) == 2


def test_p2u_codec_is_a_broadcast_codec():
    x = torch.randn(33, 65)
    codec = get_codec("p2u", stage_bits=[4, 4])
    p = codec.encode(x)
    assert p.nbytes == codec.wire_bytes(tuple(x.shape)) == sum(stage_bytes(cfg=codec.cfg, shape=x.shape))
    assert torch.allclose(decode_checked(codec, p), decode_stages(encode_stages(x, cfg=codec.cfg)))
    exact = get_codec("p2u", stage_bits=[4], exact_final=True)
    assert torch.equal(decode_checked(exact, exact.encode(x)), x)


def _stagewise(x: np.ndarray, bits, block):
    """Oracle: stage 0 per block, then each refinement from the residual of the previous
    stage (float64), as compression.md C describes it."""
    n = x.size
    groups = -(-n // block)
    lo = np.array([x[g * block:(g + 1) * block].min() for g in range(groups)], np.float32)
    hi = np.array([x[g * block:(g + 1) * block].max() for g in range(groups)], np.float32)
    step0 = ((hi - lo) * np.float32(1.0 / ((1 << bits[0]) - 1))).astype(np.float32)
    lo_e, step = np.repeat(lo.astype(np.float64), block)[:n], np.repeat(step0.astype(np.float64), block)[:n]
    w = x.astype(np.float64)
    c = np.clip(np.where(step > 0, np.rint((w - lo_e) / np.where(step > 0, step, 1)), 0), 0, (1 << bits[0]) - 1)
    codes, approx = [c.astype(np.uint8)], lo_e + step * c
    for b in bits[1:]:
        fine = step / (1 << b)
        c = np.clip(np.where(fine > 0, np.floor((w - approx + step / 2) / np.where(fine > 0, fine, 1)), 0), 0, (1 << b) - 1)
        codes.append(c.astype(np.uint8))
        approx, step = approx - step / 2 + (c + 0.5) * fine, fine
    return codes, approx.astype(np.float32)


@pytest.mark.parametrize("bits,block", [((4, 4, 8), 4096), ((2, 3), 7), ((3,), 64), ((1, 1, 6, 8), 100)])
def test_closed_form_stages_equal_stagewise_refinement(bits, block):
    from fedray.compression.codecs._bits import unpack

    x = (_tensor(20_000, seed=5) * 3).numpy()
    x[:500] = 0.25  # a constant block: step 0
    stages = encode_stages(torch.from_numpy(x), cfg=P2UConfig(stage_bits=bits, block=block))
    codes, approx = _stagewise(x, bits, block)
    groups = -(-x.size // block)
    for k, (p, ref) in enumerate(zip(stages, codes)):
        data = np.frombuffer(memoryview(p.data), np.uint8)[8 * groups if k == 0 else 0:]
        assert np.array_equal(unpack(data, bits[k], x.size), ref), k
    np.testing.assert_allclose(decode_stages(stages).numpy(), approx, rtol=1e-6, atol=1e-6)
