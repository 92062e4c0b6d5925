import numpy as np
import pytest
import torch

from fedray.orchestrator.aggregation import FedAvg, RunningWeightedSum


def _updates(rng, n, shapes):
    return [({k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()},
             float(rng.integers(1, 100))) for _ in range(n)]


def test_running_sum_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 3), "b": (3,)}
    ups = _updates(rng, 17, shapes)
    agg = RunningWeightedSum(shapes)
    for u, w in ups:
        agg.add(u, w)
    weights = np.array([w for _, w in ups])
    for k in shapes:
        stack = np.stack([u[k].numpy().astype(np.float64) for u, _ in ups])
        oracle = np.tensordot(weights, stack, axes=1) / weights.sum()
        np.testing.assert_allclose(agg.mean()[k].numpy(), oracle, rtol=1e-6, atol=1e-7)
    assert agg.count == 17 and agg.total_weight == weights.sum()


def test_order_does_not_change_the_float32_result():
    rng = np.random.default_rng(1)
    shapes = {"w": (64, 32)}
    ups = _updates(rng, 50, shapes)
    a, b = RunningWeightedSum(shapes), RunningWeightedSum(shapes)
    for u, w in ups:
        a.add(u, w)
    for u, w in reversed(ups):
        b.add(u, w)
    assert torch.equal(a.mean()["w"], b.mean()["w"])


def test_merge_equals_single_sum():
    rng = np.random.default_rng(2)
    shapes = {"w": (4, 4)}
    ups = _updates(rng, 10, shapes)
    whole, p1, p2 = (RunningWeightedSum(shapes) for _ in range(3))
    for i, (u, w) in enumerate(ups):
        whole.add(u, w)
        (p1 if i % 2 else p2).add(u, w)
    p1.merge(p2)
    torch.testing.assert_close(p1.mean()["w"], whole.mean()["w"])


def test_rejects_bad_updates():
    agg = RunningWeightedSum({"w": (2,)})
    with pytest.raises(ValueError, match="shape"):
        agg.add({"w": torch.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="tensors"):
        agg.add({"v": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="weight"):
        agg.add({"w": torch.zeros(2)}, 0.0)
    with pytest.raises(ValueError, match="no updates"):
        agg.mean()


def test_fedavg_applies_weighted_mean_delta():
    g = {"w": torch.tensor([1.0, 2.0])}
    agg = RunningWeightedSum({"w": (2,)})
    agg.add({"w": torch.tensor([1.0, 0.0])}, 1.0)
    agg.add({"w": torch.tensor([0.0, 3.0])}, 3.0)
    out = FedAvg(server_lr=0.5).apply(g, agg)
    torch.testing.assert_close(out["w"], torch.tensor([1.0 + 0.5 * 0.25, 2.0 + 0.5 * 2.25]))
