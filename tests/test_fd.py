"""Federated Dropout: index policies, extract/embed identity, count-averaging vs a NumPy oracle,
sub-model equivalence, keep rates, FLOPs and pruning."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedray.compression.fd import (
    CountedSum, KeepRateConfig, SubnetSpec, apply_mask, cubic_sparsity, embed, extract,
    flops_per_example, keep_rate_for, magnitude_mask, make_subnet, mlp_flops, submodel_hidden,
)
from fedray.workers.models import build_model, get_params, layout_of, model_layout, set_params

ARCHS = [
    ("mlp", (6, 4), (10, 7)),
    ("cnn", (8, 8), (3, 5, 6)),
    ("conv1d", (9, 4), (6, 5)),
    ("gru", (7, 4), (6, 5)),
]


def _seeded(kind, shape, hidden, seed=0):
    torch.manual_seed(seed)
    return build_model(kind, shape, 3, hidden)


def test_policies_indices():
    lay = model_layout("mlp", (4,), 2, (8, 10))
    pre = make_subnet(lay, keep_rate=0.5, policy="prefix", seed=1)
    assert pre["h0"].tolist() == [0, 1, 2, 3] and pre["h1"].tolist() == [0, 1, 2, 3, 4]
    roll = make_subnet(lay, keep_rate=0.5, policy="rolling", seed=1, round=3, stride=2)
    assert roll["h0"].tolist() == [0, 1, 6, 7]  # window 6,7,0,1 wraps around 8
    assert roll["h1"].tolist() == [0, 6, 7, 8, 9]
    a = make_subnet(lay, keep_rate=0.75, policy="random", seed=5, round=2, client=3)
    b = SubnetSpec(5, 0.75, "random", 2, 3).indices(lay)
    assert all(torch.equal(a[g], b[g]) for g in a)
    assert all(x.dtype == torch.int64 and bool((x[1:] > x[:-1]).all()) for x in a.values())
    assert len(a["h0"]) == 6 and len(a["h1"]) == 8  # ceil(0.75 * n)
    c = make_subnet(lay, keep_rate=0.75, policy="random", seed=5, round=2, client=4)
    assert any(not torch.equal(a[g], c[g]) for g in a)


def test_spec_is_small_and_validated():
    spec = SubnetSpec(seed=2**63, keep_rate=0.5, policy="prefix", round=7, client=11)
    assert pickle.loads(pickle.dumps(spec)) == spec and len(pickle.dumps(spec)) < 200
    with pytest.raises(ValueError, match="keep_rate"):
        SubnetSpec(0, 0.0)
    with pytest.raises(ValueError, match="policy"):
        SubnetSpec(0, 0.5, "nope")


@pytest.mark.parametrize("kind,shape,hidden", ARCHS)
@pytest.mark.parametrize("policy", ["random", "prefix", "rolling"])
def test_extract_embed_identity(kind, shape, hidden, policy):
    model = _seeded(kind, shape, hidden)
    lay, params = layout_of(model), get_params(model)
    spec = SubnetSpec(3, 0.6, policy, round=4, client=2)
    sub = extract(params, lay, spec)
    sub_model = build_model(kind, shape, 3, submodel_hidden(lay, spec))
    assert {k: tuple(v.shape) for k, v in get_params(sub_model).items()} == {k: tuple(v.shape) for k, v in sub.items()}
    values, counts = embed(sub, lay, spec, weight=2.0)
    for k, p in params.items():
        trained = counts[k] > 0
        assert torch.equal(values[k][trained] / 2.0, p[trained].double())
        assert bool((values[k][~trained] == 0).all()) and set(counts[k].unique().tolist()) <= {0.0, 2.0}
    # extract of the embedded values gives the sub-model back
    back = extract({k: v.float() / 2 for k, v in values.items()}, lay, spec)
    assert all(torch.equal(back[k], sub[k]) for k in sub)


@pytest.mark.parametrize("kind,shape,hidden", ARCHS)
def test_submodel_computes_the_dropped_network(kind, shape, hidden):
    """Full model with the dropped units' outgoing weights zeroed == the dense sub-model."""
    model = _seeded(kind, shape, hidden, seed=1)
    lay, params = layout_of(model), get_params(model)
    spec = SubnetSpec(9, 0.5, "random", round=1, client=1)
    kept = spec.indices(lay)
    sizes = lay.group_sizes()
    zeroed = {k: v.clone() for k, v in params.items()}
    for name, axes in lay.axes:
        for d, ax in enumerate(axes):
            if d >= 1 and ax is not None:  # input side of a weight: cut the dropped units off
                keep = torch.zeros(sizes[ax.group] * ax.expand * ax.tile, dtype=torch.bool)
                idx = (kept[ax.group][:, None] * ax.expand + torch.arange(ax.expand)).reshape(-1)
                keep[idx] = True
                zeroed[name] = zeroed[name] * keep.reshape((1, -1) + (1,) * (zeroed[name].dim() - 2)).to(zeroed[name].dtype)
    set_params(model, zeroed)
    sub_model = build_model(kind, shape, 3, submodel_hidden(lay, spec))
    set_params(sub_model, extract(zeroed, lay, spec))
    x = torch.randn(5, *shape)
    with torch.no_grad():
        torch.testing.assert_close(sub_model(x), model(x), rtol=1e-5, atol=1e-5)


def _oracle(global_np, subs, specs, weights, lay):
    """Per-element weighted average over trainers, by explicit NumPy index arrays."""
    sizes = lay.group_sizes()
    out = {}
    for name, g in global_np.items():
        s, c = np.zeros(g.shape), np.zeros(g.shape)
        for sub, spec, w in zip(subs, specs, weights):
            kept = spec.indices(lay)
            idx = []
            for d, n in enumerate(g.shape):
                ax = dict(lay.axes)[name][d] if d < len(dict(lay.axes)[name]) else None
                if ax is None:
                    idx.append(np.arange(n))
                else:
                    k = kept[ax.group].numpy()
                    idx.append(np.concatenate([t * sizes[ax.group] * ax.expand + (k[:, None] * ax.expand + np.arange(ax.expand)).ravel()
                                               for t in range(ax.tile)]))
            ix = np.ix_(*idx)
            s[ix] += w * sub[name].numpy().astype(np.float64)
            c[ix] += w
        out[name] = np.where(c > 0, s / np.where(c > 0, c, 1), g)
    return out


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nclients=st.integers(1, 4), rate=st.sampled_from([0.3, 0.5, 0.8]),
       arch=st.sampled_from(ARCHS))
def test_counted_mean_matches_numpy_oracle(seed, nclients, rate, arch):
    kind, shape, hidden = arch
    lay = model_layout(kind, shape, 3, hidden)
    rng = np.random.default_rng(seed)
    glob = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in lay.shapes}
    acc = CountedSum(dict(lay.shapes))
    specs = [SubnetSpec(seed, rate, "random", round=0, client=i) for i in range(nclients)]
    weights = [float(rng.integers(1, 50)) for _ in specs]
    subs = []
    for spec, w in zip(specs, weights):
        sub = {k: torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(np.float32))
               for k, v in extract(glob, lay, spec).items()}
        subs.append(sub)
        acc.add(sub, lay, spec, w)
    want = _oracle({k: v.numpy() for k, v in glob.items()}, subs, specs, weights, lay)
    got = acc.mean_or_keep(glob)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].astype(np.float32), rtol=1e-5, atol=1e-6)
    delta = acc.mean_delta()
    for k in want:
        untouched = acc.counts[k] == 0
        assert bool((delta[k][untouched] == 0).all())


def test_counted_sum_rejects_bad_updates_and_merges():
    lay = model_layout("mlp", (4,), 2, (6,))
    spec = SubnetSpec(1, 0.5, "prefix")
    sub = extract({k: torch.ones(s) for k, s in lay.shapes}, lay, spec)
    acc = CountedSum(dict(lay.shapes))
    with pytest.raises(ValueError, match="weight"):
        acc.add(sub, lay, spec, 0.0)
    with pytest.raises(ValueError, match="shape"):
        acc.add({**sub, "1.weight": torch.ones(6, 4)}, lay, spec, 1.0)
    a, b = CountedSum(dict(lay.shapes)), CountedSum(dict(lay.shapes))
    a.add(sub, lay, spec, 1.0)
    b.add(sub, lay, SubnetSpec(2, 0.5, "rolling", round=2, stride=3), 3.0)  # window 0..2 again
    a.merge(b)
    assert a.num_updates == 2 and float(a.counts["1.bias"].max()) == 4.0


def test_keep_rates_fixed_and_drawn():
    fixed = KeepRateConfig(keep_rates=(0.25, 0.5, 1.0), mode="fixed")
    drawn = KeepRateConfig(keep_rates=(0.25, 0.5, 1.0), mode="drawn", probs=(0.2, 0.3, 0.5))
    assert {keep_rate_for(7, r, fixed, seed=3) for r in range(20)} == {keep_rate_for(7, 0, fixed, seed=3)}
    assert len({keep_rate_for(7, r, drawn, seed=3) for r in range(40)}) > 1
    assert keep_rate_for(7, 5, drawn, seed=3) == keep_rate_for(7, 5, drawn, seed=3)
    with pytest.raises(ValueError, match="probs"):
        KeepRateConfig(keep_rates=(0.5, 1.0), probs=(0.5,))
    with pytest.raises(ValueError, match="mode"):
        KeepRateConfig(mode="sometimes")


def test_flops():
    lay = model_layout("mlp", (28, 28), 10, (200, 200))
    assert flops_per_example(lay) == mlp_flops([784, 200, 200, 10]) == 6 * (784 * 200 + 200 * 200 + 2000)
    spec = SubnetSpec(0, 0.5, "prefix")
    assert flops_per_example(lay, spec) == mlp_flops([784, 100, 100, 10])
    cnn = model_layout("cnn", (28, 28), 10, (8, 16, 32))
    assert flops_per_example(cnn, train=False) == 2 * (784 * 8 * 25 + 196 * 16 * 8 * 25 + 16 * 49 * 32 + 32 * 10)


def test_cubic_schedule_and_masks():
    assert cubic_sparsity(0, start=2, end=10, target=0.8) == 0.0
    assert cubic_sparsity(10, start=2, end=10, target=0.8) == pytest.approx(0.8)
    assert cubic_sparsity(6, start=2, end=10, target=0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    vals = [cubic_sparsity(r, start=0, end=10, target=0.9) for r in range(12)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    params = {"w": torch.tensor([[0.1, -3.0], [2.0, -0.2]]), "b": torch.tensor([0.01, 5.0])}
    m = magnitude_mask(params, 0.5)
    assert set(m) == {"w"} and m["w"].tolist() == [[False, True], [True, False]]
    apply_mask(params, m)
    assert params["w"].tolist() == [[0.0, -3.0], [2.0, -0.0]]
    assert math.isclose(1 - float(magnitude_mask({"x": torch.randn(100, 10)}, 0.7)["x"].double().mean()), 0.7)


def test_subnet_bytes_down_sums_each_clients_encoded_sub_model():
    from fedray.compression import get_codec
    from fedray.orchestrator.spec import DropoutSpec
    from fedray.orchestrator.subnet_bytes import client_subnet, subnet_bytes_down

    lay = model_layout("cnn", (28, 28), 10, (8, 16, 32))
    torch.manual_seed(0)
    params = get_params(build_model("cnn", (28, 28), 10, (8, 16, 32)))
    int8 = get_codec("int8")
    size = lambda p: sum(int8.encode(v).nbytes for v in p.values())  # noqa: E731
    drop = DropoutSpec(keep_rates=(0.25, 0.5, 1.0), mode="drawn")
    ids = [3, 7, 11, 20, 31]
    got = subnet_bytes_down(params, lay, drop, job_seed=5, round=2, client_ids=ids, encoded_bytes=size)
    specs = [client_subnet(drop, job_seed=5, round=2, client_id=c) for c in ids]
    assert len({s.keep_rate for s in specs}) > 1  # clients of different sizes in one round
    want = 0
    for s in specs:
        sub = lay.sub_shapes(s)
        want += sum(int8.encode(torch.randn(sub[k])).nbytes for k in params)  # int8 size: shape only
    assert got == want
    assert got < len(ids) * size(params)
    full = subnet_bytes_down(params, lay, DropoutSpec(keep_rates=(1.0,)), job_seed=5, round=2, client_ids=ids,
                             encoded_bytes=size)
    assert full == len(ids) * size(params)


class _Scale(torch.nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def test_inverted_scaling_is_sgd_with_scaled_activations():
    """`inverted_scaling` trains the sub-model's weights exactly as SGD (with momentum) on the
    same weights with each dropped layer's kept outputs multiplied by units / kept."""
    import copy

    from fedray.compression.fd import input_scales, inverted_scaling

    torch.manual_seed(0)
    full = build_model("mlp", (6,), 3, (8, 6))
    lay, params = layout_of(full), get_params(full)
    spec = SubnetSpec(4, 0.5, "random", round=2, client=1)
    scales = input_scales(lay, spec)
    assert scales == {"3.weight": 2.0, "5.weight": 2.0}  # the input and the classes are never dropped
    sub = build_model("mlp", (6,), 3, submodel_hidden(lay, spec))
    set_params(sub, extract(params, lay, spec))
    ref = copy.deepcopy(sub)
    ref_net = torch.nn.Sequential(ref[0], ref[1], ref[2], _Scale(2.0), ref[3], ref[4], _Scale(2.0), ref[5])
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with inverted_scaling(sub, scales):
        opt = torch.optim.SGD(sub.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
        for i in range(0, 16, 4):
            for net, o in ((sub, opt), (ref_net, ref_opt)):
                o.zero_grad()
                torch.nn.functional.cross_entropy(net(x[i:i + 4]), y[i:i + 4]).backward()
                o.step()
    got, want = get_params(sub), get_params(ref)
    assert not torch.equal(want["3.weight"], extract(params, lay, spec)["3.weight"])  # it trained
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    plain = build_model("mlp", (6,), 3, submodel_hidden(lay, spec))  # no hooks left: equal gradients
    set_params(plain, got)
    for net in (sub, plain):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(sub[3].weight.grad, plain[3].weight.grad)


def test_input_scales_modes_and_errors():
    from fedray.compression.fd import input_scales

    lay = layout_of(build_model("gru", (7, 4), 3, (8, 6)))
    spec = SubnetSpec(1, 0.5, "random")
    every, ff = input_scales(lay, spec, "all"), input_scales(lay, spec, "feedforward")
    rec = [k for k, axes in lay.axes if len(axes) > 1 and None not in axes[:2] and axes[1].group == axes[0].group]
    assert rec and all(every[k] == 2.0 and k not in ff for k in rec)
    assert {k: v for k, v in every.items() if k not in rec} == ff and ff
    assert input_scales(lay, spec, "none") == {} and input_scales(lay, SubnetSpec(1, 1.0), "all") == {}
    with pytest.raises(ValueError, match="dropout.scaling"):
        input_scales(lay, spec, "half")


def test_client_step_trains_with_the_dropout_scaling_of_the_spec():
    """A job's `dropout.scaling: all` reaches the worker: the uploaded sub-model delta equals
    training the sub-model with its kept hidden outputs multiplied by units / kept."""
    import copy

    import fedray
    from fedray.orchestrator.spec import DropoutSpec
    from fedray.workers.broadcast import make_broadcast
    from fedray.workers.client import TrainerSetup
    from fedray.workers.step import ClientStep, client_seed
    from fedray.workers.train import TrainConfig
    from fedray.compression import decode_checked, get_codec

    class MLPTask(fedray.Task):
        def model(self):
            return build_model("mlp", (6,), 3, (8, 6))

        def fd_layout(self):
            return layout_of(self.model())

        def fd_model(self, hidden):
            return build_model("mlp", (6,), 3, tuple(hidden))

        def num_clients(self):
            return 2

        def client_data(self, cid):
            g = torch.Generator().manual_seed(cid)
            return torch.utils.data.TensorDataset(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g))

        def test_data(self):
            return self.client_data(0)

    task = MLPTask()
    torch.manual_seed(3)
    start = get_params(task.model())
    bcast = make_broadcast(start, codec="identity", codec_params={}, round=1)
    deltas = {}
    for scaling in ("none", "all"):
        setup = TrainerSetup(job_id="j", secret="s", seed=5, codec="identity",
                             train=TrainConfig(local_epochs=1, batch_size=8, lr=0.1, momentum=0.5),
                             dropout=DropoutSpec(keep_rates=(0.5,), scaling=scaling))
        step = ClientStep(setup, task, torch.device("cpu"))
        out = step.run(1, start, 1, bcast)
        deltas[scaling] = {k: decode_checked(get_codec("identity"), p) for k, p in out.tensors}
    seed = client_seed(5, 1, 1)
    lay = task.fd_layout()
    spec = SubnetSpec(seed=seed, keep_rate=0.5, policy="random", round=1, client=1)
    base = extract(start, lay, spec)
    ref = task.fd_model(submodel_hidden(lay, spec))
    set_params(ref, copy.deepcopy(base))
    net = torch.nn.Sequential(ref[0], ref[1], ref[2], _Scale(2.0), ref[3], ref[4], _Scale(2.0), ref[5])
    task.train(net, task.client_data(1), step.context(1, 1, seed))
    want = {k: v - base[k] for k, v in get_params(ref).items()}
    for k, v in want.items():
        torch.testing.assert_close(deltas["all"][k], v, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(deltas["none"]["3.weight"], want["3.weight"], atol=1e-4)
