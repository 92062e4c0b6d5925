"""OMC's fused kernels: the numba kernels against their torch fallback (same random bits, same
codes but for the last float bit), seeded reproducible rounding, the flat one-call step against
the per-variable step, and training on either implementation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedray.compression import omc_kernels as K
from fedray.compression.omc import OMCConfig, OMCModel
from fedray.workers.models import build_model

nb = K.numba_kernels()
needs_numba = pytest.mark.skipif(nb is None, reason="numba kernels unavailable (numba missing or FEDRAY_OMC_NUMBA=0)")


@pytest.fixture(params=["numba", "torch"])
def backend(request, monkeypatch):
    """Each OMC kernel set in turn: the numba kernels (skipped where they do not load), the torch ops."""
    if request.param == "numba" and nb is None:
        pytest.skip("numba kernels unavailable")
    if request.param == "torch":
        monkeypatch.setattr(K, "_nb", False)
    return request.param


@pytest.fixture
def torch_kernels(monkeypatch):
    """The torch fallback, as without numba."""
    monkeypatch.setattr(K, "_nb", False)
    assert K.numba_kernels() is None


class _Untracked:
    def track(self, t):
        return t


def _ws(block=1000):
    return K.Workspace(_Untracked(), block)


def _random_case(n=5003, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, n).astype(np.uint8)
    grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    return codes, grad


@needs_numba
def test_random_bits_identical_in_numba_and_torch():
    key, counter, n = K.splitmix64(42), 7, 1001
    r = K.random16_torch(key, counter, n).numpy()
    assert r.min() > 0 and r.max() < 1 and len(np.unique(r)) > 990
    # the numba kernel rounds x + r down: with x = k / 256, the code is 1 exactly where r >= 1 - x
    x = (np.arange(n) % 256 / 256).astype(np.float32)
    codes = np.empty(n, np.uint8)
    nb.quantize(x, 0.0, 1.0, 255.0, True, np.uint64(key), np.uint64(counter), codes)
    assert codes.tolist() == (x + r >= 1).astype(np.uint8).tolist()


@needs_numba
@pytest.mark.parametrize("stochastic", [True, False])
def test_numba_and_torch_agree(stochastic, monkeypatch):
    codes, grad = _random_case()
    w = torch.randn(5003) * 3
    out = []
    for backend in (nb, False):
        monkeypatch.setattr(K, "_nb", backend)
        ws = _ws()
        rnd = K.Rounder(5 if stochastic else None)
        lo_hi = K.update_range(codes, grad, -0.3, ws)
        c = codes.copy()
        rnd.requantize(c, grad, -0.3, 0.9, 1.5, 255, ws)
        c2 = np.empty(5003, np.uint8)
        rnd.quantize_into(w.clone(), -2.0, 0.05, 255, c2)
        out.append((lo_hi, c, c2, rnd.counter))
    (r1, a1, q1, n1), (r2, a2, q2, n2) = out
    u = codes.astype(np.float32) + np.float32(-0.3) * grad.numpy()
    assert r1 == pytest.approx(r2, abs=1e-4) and r1 == pytest.approx((float(u.min()), float(u.max())), abs=1e-4)
    assert n1 == n2 == (-(-5003 // 4) * 2 if stochastic else 0)  # 4 values per SplitMix64 output
    for x, y in ((a1, a2), (q1, q2)):  # same bits: equal but where float rounding differs in the last bit
        assert np.abs(x.astype(int) - y).max() <= 1 and (x == y).mean() > 0.999


def test_rounding_unbiased_seeded_and_in_range(backend):
    codes = np.full(100_000, 10, np.uint8)
    grad = torch.full((100_000,), -1.0)
    runs = []
    for seed in (3, 3, 4):
        c = codes.copy()
        K.Rounder(seed).requantize(c, grad, -0.6, 1.0, -5.0, 255, _ws(4096))  # 10 + 0.6 - 5 = 5.6
        runs.append(c)
    assert set(np.unique(runs[0]).tolist()) == {5, 6} and abs(runs[0].mean() - 5.6) < 0.01
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    c = np.array([0, 255, 100], np.uint8)
    K.Rounder(None).requantize(c, torch.tensor([5.0, -5.0, 0.2]), -100.0, 1.0, 0.0, 255, _ws())
    assert c.tolist() == [0, 255, 80]  # clamped at both ends; 100 - 20 rounds to nearest


def _train(om, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.rand(16, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        torch.nn.functional.cross_entropy(om.model(x), y).backward()
        om.step(0.1)
    return om


@needs_numba
def test_flat_step_equals_per_variable_step(monkeypatch):
    from fedray.compression import omc

    torch.manual_seed(0)
    model = build_model("mlp", (8, 8), 4, (24, 16))
    flat = _train(OMCModel(copy.deepcopy(model), OMCConfig(bits=8, stochastic=True), seed=9))
    assert flat._flat and all(qp.buf.base is flat._flat.codes for qp in flat.q.values())
    monkeypatch.setattr(omc, "_FLAT_MAX", 0)
    each = _train(OMCModel(copy.deepcopy(model), OMCConfig(bits=8, stochastic=True), seed=9))
    assert not each._flat
    for n in flat.q:
        assert np.array_equal(flat.q[n].buf, each.q[n].buf)
        assert (flat.q[n].alpha, flat.q[n].beta) == (each.q[n].alpha, each.q[n].beta)
    assert flat._rounder.counter == each._rounder.counter > 0


def test_training_on_either_kernel_set_and_reload(backend):
    torch.manual_seed(0)
    model = build_model("mlp", (8, 8), 4, (24, 16))
    om = _train(OMCModel(copy.deepcopy(model), OMCConfig(bits=8, stochastic=True, block_bytes=512), seed=1))
    again = _train(OMCModel(copy.deepcopy(model), OMCConfig(bits=8, stochastic=True, block_bytes=512), seed=1))
    assert all(np.array_equal(om.q[n].buf, again.q[n].buf) for n in om.q)  # reproducible from the seed
    before = om.dequantized()
    assert all(float((before[n] - p).abs().max()) > 0 for n, p in model.state_dict().items() if n in om.q)
    # a downloaded model replaces the codes; the next steps run on them
    om.load_payloads(again.to_payloads())
    _train(om, steps=1, seed=5)
    _train(again, steps=1, seed=5)
    assert all(np.array_equal(om.q[n].buf, again.q[n].buf) for n in om.q)
    assert om.peak_transient_bytes() <= 512  # one block of the workspace, range scratch included
