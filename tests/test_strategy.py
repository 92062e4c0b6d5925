"""Server strategies: FedAvg and FedOpt optimizers, robust reducers, clipping, config, metrics.

Expected values come from a NumPy oracle or are worked out by hand in the comments.
"""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedray.orchestrator import aggregation
from fedray.orchestrator.aggregation import (
    BufferFullError, BufferedUpdates, CoordinateMedian, Krum, RunningWeightedSum, TrimmedMean, clip_update,
)
from fedray.orchestrator.spec import SpecError
from fedray.orchestrator.strategy import (
    FedAvg, ServerAdagrad, ServerAdam, ServerSGD, ServerYogi, StrategySpec, aggregate_metrics,
    available_strategies, build_strategy,
)

SHAPES = {"w": (4, 3), "b": (3,)}


def _updates(rng, n, shapes=SHAPES):
    return [({k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()},
             float(rng.integers(1, 50))) for _ in range(n)]


def _collect(strategy, ups, shapes=SHAPES):
    agg = strategy.new_collector(shapes, max_clients=max(len(ups), 1))
    for u, w in ups:
        agg.add(strategy.prepare_update(u), w)
    return agg


def _close(a, b):
    # numpy rather than torch.testing, whose first call costs seconds of lazy imports
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1.3e-6, atol=1e-5)


def _scalar(x):
    return {"x": torch.tensor([x], dtype=torch.float32)}


def _agg_of(delta):
    agg = RunningWeightedSum({"x": (1,)})
    agg.add(_scalar(delta), 1.0)
    return agg


# -- FedAvg and server optimizers ------------------------------------------------------------------

def test_fedavg_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    ups = _updates(rng, 13)
    g = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    s = FedAvg(server_lr=0.7)
    out = s.aggregate(g, _collect(s, ups))
    w = np.array([w for _, w in ups])
    for k in SHAPES:
        stack = np.stack([u[k].numpy().astype(np.float64) for u, _ in ups])
        oracle = g[k].numpy() + 0.7 * (np.tensordot(w, stack, axes=1) / w.sum())
        np.testing.assert_allclose(out[k].numpy(), oracle, rtol=1e-6, atol=1e-6)


def test_fedavg_is_bit_identical_to_the_old_formula():
    rng = np.random.default_rng(1)
    ups = _updates(rng, 7)
    g = {k: torch.ones(s) for k, s in SHAPES.items()}
    s = FedAvg(server_lr=0.5)
    agg = _collect(s, ups)
    mean = agg.mean()
    out = s.apply(g, agg)  # `apply`: the name the round loop calls
    for k in g:
        assert torch.equal(out[k], g[k] + 0.5 * mean[k])


def test_old_import_path_still_works():
    from fedray.orchestrator.aggregation import FedAvg as Old

    assert Old is FedAvg
    assert aggregation.FedAvg is FedAvg


def test_fedavgm_momentum_by_hand():
    # g = -delta; b1 = g1; b2 = 0.9 b1 + g2; x <- x - lr b.
    # x0 = 1, lr = 0.5, deltas 1.0 then 0.5:
    # b1 = -1 -> x1 = 1 + 0.5 = 1.5; b2 = -0.9 - 0.5 = -1.4 -> x2 = 1.5 + 0.7 = 2.2
    s = FedAvg(server_optimizer=ServerSGD(lr=0.5, momentum=0.9))
    x = s.aggregate(_scalar(1.0), _agg_of(1.0))
    assert x["x"].item() == pytest.approx(1.5)
    x = s.aggregate(x, _agg_of(0.5))
    assert x["x"].item() == pytest.approx(2.2, rel=1e-6)


# Reddi et al. 2021, Algorithm 2: m0 = 0, v0 = tau^2; lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3;
# x0 = 1, delta 0.5 then 0.01.
def _adaptive_by_hand(second_moment):
    lr, b1, tau = 0.1, 0.9, 1e-3
    x, m, v = 1.0, 0.0, tau ** 2
    xs = []
    for d in (0.5, 0.01):
        m = b1 * m + (1 - b1) * d
        v = second_moment(v, d * d)
        x = x + lr * m / (math.sqrt(v) + tau)
        xs.append(x)
    return xs


@pytest.mark.parametrize("opt,second_moment,first", [
    # Adam:    v1 = 0.99e-6 + 0.01 * 0.25 = 0.00250099; x1 = 1 + 0.1 * 0.05 / (0.0500099 + 0.001) = 1.098020
    (ServerAdam, lambda v, g2: 0.99 * v + 0.01 * g2, 1.0980201),
    # Yogi:    v0 - g^2 < 0 so v1 = 1e-6 + 0.01 * 0.25 = 0.002501; then v1 > g2^2 = 1e-4 so v2 = v1 - 0.01e-4
    (ServerYogi, lambda v, g2: v - 0.01 * g2 * np.sign(v - g2), 1.0980199),
    # Adagrad: v1 = 1e-6 + 0.25; x1 = 1 + 0.1 * 0.05 / (0.500001 + 0.001) = 1.00998
    (ServerAdagrad, lambda v, g2: v + g2, 1.0099800),
])
def test_adaptive_optimizers_by_hand(opt, second_moment, first):
    kw = dict(lr=0.1, beta1=0.9, tau=1e-3) | ({} if opt is ServerAdagrad else dict(beta2=0.99))
    s = FedAvg(server_optimizer=opt(**kw))
    want = _adaptive_by_hand(second_moment)
    assert want[0] == pytest.approx(first, abs=1e-6)
    x = s.aggregate(_scalar(1.0), _agg_of(0.5))
    assert x["x"].item() == pytest.approx(want[0], rel=1e-6)
    x = s.aggregate(x, _agg_of(0.01))
    assert x["x"].item() == pytest.approx(want[1], rel=1e-6)


def test_yogi_differs_from_adam_when_the_second_moment_shrinks():
    # Once v > g^2, Adam shrinks v by the factor beta2, Yogi only by (1 - beta2) g^2.
    a, y = (FedAvg(server_optimizer=o(lr=0.1)) for o in (ServerAdam, ServerYogi))
    xa, xy = _scalar(0.0), _scalar(0.0)
    for d in (1.0, 0.01, 0.01):
        xa, xy = a.aggregate(xa, _agg_of(d)), y.aggregate(xy, _agg_of(d))
    assert a._opt_state.slots["v"]["x"].item() < y._opt_state.slots["v"]["x"].item()


@pytest.mark.parametrize("name,params", [
    ("fedavgm", dict(server_momentum=0.9)),
    ("fedadam", dict(server_lr=0.05)),
    ("fedyogi", dict(server_lr=0.05)),
    ("fedadagrad", dict(server_lr=0.05)),
])
def test_state_dict_round_trip_gives_bit_identical_next_step(name, params):
    rng = np.random.default_rng(3)
    rounds = [_updates(rng, 5) for _ in range(3)]
    g = {k: torch.zeros(s) for k, s in SHAPES.items()}
    a = build_strategy(name, **params)
    for ups in rounds[:2]:
        g = a.aggregate(g, _collect(a, ups))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_strategy(name, **params)
    b.load_state_dict(torch.load(buf))
    out_a, out_b = a.aggregate(g, _collect(a, rounds[2])), b.aggregate(g, _collect(b, rounds[2]))
    for k in g:
        assert torch.equal(out_a[k], out_b[k])
    # a fresh strategy (no state) takes a different step
    c = build_strategy(name, **params)
    assert not torch.equal(c.aggregate(g, _collect(c, rounds[2]))["w"], out_a["w"])


def test_state_dict_is_a_copy():
    s = build_strategy("fedadam", server_lr=0.1)
    s.aggregate(_scalar(0.0), _agg_of(1.0))
    sd = s.state_dict()
    sd["optimizer"]["slots"]["m"]["x"].fill_(123.0)
    assert s._opt_state.slots["m"]["x"].item() != 123.0
    assert FedAvg().state_dict() == {"optimizer": None}


def test_server_lr_and_optimizer_are_exclusive():
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(server_lr=0.5, server_optimizer=ServerAdam())
    with pytest.raises(ValueError, match="beta2"):
        ServerAdam(beta2=1.0)


# -- robust reducers --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_median_matches_numpy(n, monkeypatch):
    monkeypatch.setattr(aggregation, "_WORK_BYTES", 1)  # chunk of 1024 coords: exercise the chunking
    shapes = {"w": (50, 41), "b": (7,)}
    ups = _updates(np.random.default_rng(n), n, shapes)
    s = build_strategy("median")
    out = s.reduce(_collect(s, ups, shapes))
    for k in shapes:
        oracle = np.median(np.stack([u[k].numpy().astype(np.float64) for u, _ in ups]), axis=0)
        np.testing.assert_allclose(out[k].numpy(), oracle.astype(np.float32), rtol=0, atol=0)


def _trimmed_oracle(stack, beta):
    n = stack.shape[0]
    k = int(np.floor(beta * n))
    return np.sort(stack, axis=0)[k:n - k].mean(axis=0)


@pytest.mark.parametrize("n,beta", [(1, 0.1), (4, 0.25), (10, 0.1), (10, 0.2), (11, 0.45), (6, 0.0)])
def test_trimmed_mean_matches_numpy(n, beta):
    ups = _updates(np.random.default_rng(10 + n), n)
    s = build_strategy("trimmed_mean", trim_ratio=beta)
    out = s.reduce(_collect(s, ups))
    for k in SHAPES:
        stack = np.stack([u[k].numpy().astype(np.float64) for u, _ in ups])
        np.testing.assert_allclose(out[k].numpy(), _trimmed_oracle(stack, beta), rtol=1e-6, atol=1e-7)


def test_krum_scores_match_brute_force():
    rng = np.random.default_rng(5)
    ups = _updates(rng, 9)
    f = 2
    flat = np.stack([np.concatenate([u[k].numpy().ravel() for k in sorted(SHAPES)]).astype(np.float64) for u, _ in ups])
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d[i], i))[: 9 - f - 2].sum() for i in range(9)]
    s = build_strategy("krum", krum_f=f)
    agg = _collect(s, ups)
    assert Krum(f=f).select(agg) == [int(np.argmin(scores))]
    assert Krum(f=f, m=3).select(agg) == list(np.argsort(scores, kind="stable")[:3])
    out = s.reduce(agg)
    _close(out["w"], ups[int(np.argmin(scores))][0]["w"])


@pytest.mark.parametrize("name,params", [("median", {}), ("trimmed_mean", {"trim_ratio": 0.2}), ("krum", {"krum_f": 1})])
def test_robust_aggregation_resists_an_outlier_client(name, params):
    rng = np.random.default_rng(6)
    honest = [({k: torch.full(s, 1.0) + 0.01 * torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                for k, s in SHAPES.items()}, 1.0) for _ in range(9)]
    attacker = ({k: torch.full(s, 1e6) for k, s in SHAPES.items()}, 1000.0)  # huge update, huge claimed weight
    ups = honest + [attacker]
    g = {k: torch.zeros(s) for k, s in SHAPES.items()}
    plain = FedAvg()
    assert plain.aggregate(g, _collect(plain, ups))["w"].min() > 1e5
    robust = build_strategy(name, **params)
    out = robust.aggregate(g, _collect(robust, ups))
    for k in SHAPES:
        assert torch.all((out[k] - 1.0).abs() < 0.05), name


def test_clipping_limits_an_outliers_pull_on_fedavg():
    honest = [({"x": torch.tensor([1.0])}, 1.0) for _ in range(9)]
    ups = honest + [({"x": torch.tensor([1e6])}, 1.0)]
    s = build_strategy("fedavg", clip_norm=2.0)
    out = s.aggregate({"x": torch.zeros(1)}, _collect(s, ups, {"x": (1,)}))
    assert out["x"].item() == pytest.approx((9 * 1.0 + 2.0) / 10)


def test_buffered_reducer_on_streaming_sum_is_a_type_error():
    agg = RunningWeightedSum(SHAPES)
    agg.add({k: torch.zeros(s) for k, s in SHAPES.items()}, 1.0)
    with pytest.raises(TypeError, match="BufferedUpdates"):
        CoordinateMedian().reduce(agg)


def test_krum_needs_enough_clients():
    s = build_strategy("krum", krum_f=2)
    with pytest.raises(ValueError, match="at least 7"):
        s.reduce(_collect(s, _updates(np.random.default_rng(0), 6)))


# -- BufferedUpdates ----------------------------------------------------------------------------------

def test_buffered_updates_memory_bound():
    ups = _updates(np.random.default_rng(7), 4)
    buf = BufferedUpdates(SHAPES, max_clients=3)
    assert buf.model_bytes == 4 * (12 + 3) and buf.capacity_bytes == 3 * 60
    for u, w in ups[:3]:
        buf.add(u, w)
    assert buf.nbytes == 180
    with pytest.raises(BufferFullError, match="max_clients=3"):
        buf.add(*ups[3])
    with pytest.raises(ValueError, match="max_bytes"):
        BufferedUpdates(SHAPES, max_clients=10, max_bytes=599)
    with pytest.raises(ValueError, match="max_clients"):
        BufferedUpdates(SHAPES, max_clients=0)


def test_buffered_updates_copy_merge_and_mean():
    ups = _updates(np.random.default_rng(8), 6)
    a, b = BufferedUpdates(SHAPES, max_clients=6), BufferedUpdates(SHAPES, max_clients=3)
    ref = RunningWeightedSum(SHAPES)
    for i, (u, w) in enumerate(ups):
        (a if i < 3 else b).add(u, w)
        ref.add(u, w)
    ups[0][0]["w"].fill_(99.0)  # the buffer holds its own copy
    assert not torch.any(a.updates[0]["w"] == 99.0)
    a.merge(b)
    assert a.count == 6 and a.total_weight == ref.total_weight
    ups[0][0]["w"].copy_(a.updates[0]["w"])
    for k in SHAPES:
        _close(a.mean()[k], ref.mean()[k])
    with pytest.raises(BufferFullError):
        a.merge(b)
    with pytest.raises(ValueError, match="shape"):
        a.add({"w": torch.zeros(2), "b": torch.zeros(3)}, 1.0)


def test_new_collector_follows_the_aggregator():
    assert isinstance(build_strategy("fedadam", server_lr=0.1).new_collector(SHAPES, max_clients=5), RunningWeightedSum)
    assert isinstance(build_strategy("median").new_collector(SHAPES, max_clients=5), BufferedUpdates)
    assert build_strategy("trimmed_mean").needs_all_updates and not build_strategy("fedavg").needs_all_updates


# -- clipping -------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e4), max_norm=st.floats(1e-3, 1e3))
def test_clip_bounds_the_norm(seed, scale, max_norm):
    rng = np.random.default_rng(seed)
    u = {k: torch.from_numpy((scale * rng.standard_normal(s)).astype(np.float32)) for k, s in SHAPES.items()}
    before = {k: v.clone() for k, v in u.items()}
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in u.values()))
    clipped, factor = clip_update(u, max_norm)
    new = math.sqrt(sum(float((v.double() ** 2).sum()) for v in clipped.values()))
    assert new <= max_norm * (1 + 1e-6)
    assert factor == pytest.approx(min(1.0, max_norm / norm))
    if norm <= max_norm:
        assert factor == 1.0 and all(torch.equal(clipped[k], u[k]) for k in u)
    else:
        assert new == pytest.approx(max_norm, rel=1e-6)
    assert all(torch.equal(u[k], before[k]) for k in u)  # input untouched


def test_clip_rejects_bad_input():
    with pytest.raises(ValueError, match="max_norm"):
        clip_update({"x": torch.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"x": torch.tensor([float("nan")])}, 1.0)
    assert clip_update({"x": torch.zeros(3)}, 1.0)[1] == 1.0


# -- config and registry -----------------------------------------------------------------------------------

def test_every_registered_name_builds():
    extra = {"fedavgm": dict(server_momentum=0.9)}
    for name in available_strategies():
        s = StrategySpec(name=name, **extra.get(name, {})).build()
        assert isinstance(s, FedAvg)
    assert set(available_strategies()) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median",
                                           "trimmed_mean", "krum"}


def test_spec_builds_the_right_parts():
    s = StrategySpec(name="fedyogi", server_lr=0.02, beta1=0.5, tau=1e-2, clip_norm=3.0, proximal_mu=0.01).build()
    assert s.optimizer == ServerYogi(lr=0.02, beta1=0.5, beta2=0.99, tau=1e-2) and s.clip_norm == 3.0
    assert StrategySpec(name="trimmed_mean", trim_ratio=0.3).build().aggregator == TrimmedMean(0.3)
    assert StrategySpec(name="krum", krum_f=2).build().aggregator == Krum(f=2)
    assert StrategySpec().build().optimizer == ServerSGD(lr=1.0)


@pytest.mark.parametrize("kw,match", [
    (dict(name="fedsgd"), r"strategy\.name: must be one of"),
    (dict(server_lr=0.0), r"strategy\.server_lr: must be in \(0"),
    (dict(server_lr=True), r"strategy\.server_lr: must be a finite number"),
    (dict(name="fedadam", beta1=1.0), r"strategy\.beta1"),
    (dict(name="fedadam", beta2=-0.1), r"strategy\.beta2"),
    (dict(name="fedadam", tau=0), r"strategy\.tau"),
    (dict(name="trimmed_mean", trim_ratio=0.5), r"strategy\.trim_ratio: must be in \[0, 0\.5\)"),
    (dict(clip_norm=0.0), r"strategy\.clip_norm"),
    (dict(name="krum", krum_f=-1), r"strategy\.krum_f: must be an integer >= 0"),
    (dict(name="krum", krum_f=1.5), r"strategy\.krum_f"),
    (dict(proximal_mu=-0.1), r"strategy\.proximal_mu"),
    (dict(proximal_mu=float("nan")), r"strategy\.proximal_mu"),
    (dict(name="fedavgm"), r"strategy\.server_momentum: fedavgm needs"),
    (dict(name="median", trim_ratio=0.2), r"strategy\.trim_ratio: is not used by strategy 'median'"),
    (dict(name="fedavg", beta1=0.5), r"strategy\.beta1: is not used by strategy 'fedavg' \(only by fedadam"),
    (dict(name="fedadagrad", beta2=0.9), r"strategy\.beta2: is not used"),
])
def test_spec_errors_name_the_field(kw, match):
    with pytest.raises(SpecError, match=match):
        StrategySpec(**kw)


def test_build_strategy_rejects_unknown_parameters():
    with pytest.raises(SpecError, match=r"strategy\.momentum: unknown parameter"):
        build_strategy("fedavgm", momentum=0.9)
    with pytest.raises(SpecError, match=r"strategy\.server_momentum"):
        build_strategy("fedadam", server_momentum=0.9)


def test_spec_is_frozen_and_hashable():
    s = StrategySpec(name="fedadam", server_lr=0.01)
    with pytest.raises(Exception):
        s.name = "fedavg"
    assert hash(s) == hash(StrategySpec(name="fedadam", server_lr=0.01))


# -- evaluation metrics ------------------------------------------------------------------------------------

def test_aggregate_metrics_weighted_means():
    out = aggregate_metrics([(10, {"acc": 0.5, "loss": 2.0}), (30, {"acc": 0.9, "loss": 1.0}), (60, {"acc": 1.0})])
    assert out["acc"] == pytest.approx((5 + 27 + 60) / 100)
    assert out["loss"] == pytest.approx((20 + 30) / 40)  # only the clients that report it


@pytest.mark.parametrize("bad,match", [
    ([], "no metrics"),
    ([(0, {"acc": 1.0})], "weight"),
    ([(1, {"acc": "high"})], "metric 'acc'"),
    ([(1, {"acc": float("inf")})], "metric 'acc'"),
])
def test_aggregate_metrics_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        aggregate_metrics(bad)
