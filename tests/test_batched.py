"""Batched multi-client training equals training the clients one by one (workers.train.train_local)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedray.workers.batched import BatchedTrainingError, supports_batched, train_batched
from fedray.workers.data import load_digits, partition
from fedray.workers.models import build_model, get_params, set_params
from fedray.workers.train import TrainConfig, train_local


@pytest.fixture(scope="module")
def digits():
    return load_digits(0)


ONE_EPOCH = TrainConfig(local_epochs=1, batch_size=32, lr=0.1)

def _one_by_one(model, start, xs, ys, cfg, seeds, scale, shift):
    out = []
    for x, y, s in zip(xs, ys, seeds):
        set_params(model, start)
        st = train_local(model, x, y, scale, shift, cfg, s)
        out.append((get_params(model), st))
    return out


def _check_equal(got, want, atol):
    assert len(got) == len(want)
    for (gp, gs), (wp, ws) in zip(got, want):
        assert gp.keys() == wp.keys()
        for k in wp:
            torch.testing.assert_close(gp[k], wp[k], atol=atol, rtol=0)
        assert (gs.steps, gs.examples) == (ws.steps, ws.examples)
        assert gs.loss == pytest.approx(ws.loss, abs=1e-5)


def _clients(d, sizes, seed=0):
    rng = np.random.default_rng(seed)
    idx = [rng.choice(len(d.y_train), n, replace=False) for n in sizes]
    return [d.x_train[i] for i in idx], [d.y_train[i] for i in idx]


@pytest.mark.parametrize("momentum,epochs", [(0.0, 1), (0.0, 2), (0.9, 2)])
def test_mlp_ragged_equals_one_by_one(digits, momentum, epochs):
    # Ragged: 1 example, a partial batch, exact multiples of the batch, several batches with a tail.
    sizes = [1, 5, 32, 64, 70, 100, 2, 33]
    xs, ys = _clients(digits, sizes)
    torch.manual_seed(1)
    model = build_model("mlp", digits.input_shape, 10, (64,))
    start = get_params(model)
    cfg = TrainConfig(local_epochs=epochs, batch_size=32, lr=0.1, momentum=momentum)
    seeds = [11 * i + 3 for i in range(len(sizes))]
    got = train_batched(model, start, xs, ys, cfg, seeds, digits.scale, digits.shift)
    want = _one_by_one(model, start, xs, ys, cfg, seeds, digits.scale, digits.shift)
    _check_equal(got, want, atol=1e-5)
    assert [s.steps for _, s in got] == [epochs * -(-n // 32) for n in sizes]


def test_mlp_two_hidden_layers_benchmark_partition(digits):
    parts = partition(digits.y_train, 1000, seed=0)
    ids = list(range(40))
    xs = [digits.x_train[parts.client(i)] for i in ids]
    ys = [digits.y_train[parts.client(i)] for i in ids]
    torch.manual_seed(2)
    model = build_model("mlp", digits.input_shape, 10, (64, 32))
    start = get_params(model)
    cfg = TrainConfig(local_epochs=1, batch_size=32, lr=0.1)
    got = train_batched(model, start, xs, ys, cfg, ids, digits.scale, digits.shift)
    _check_equal(got, _one_by_one(model, start, xs, ys, cfg, ids, digits.scale, digits.shift), atol=1e-5)


def test_generic_vmap_path_conv(digits):
    # A CNN takes the torch.func (vmap + grad) path rather than the MLP fast path.
    xs, ys = _clients(digits, [3, 40, 17])
    torch.manual_seed(3)
    model = build_model("cnn", digits.input_shape, 10, (4, 8, 16))
    start = get_params(model)
    cfg = TrainConfig(local_epochs=1, batch_size=16, lr=0.05, momentum=0.5)
    got = train_batched(model, start, xs, ys, cfg, [1, 2, 3], digits.scale, digits.shift)
    _check_equal(got, _one_by_one(model, start, xs, ys, cfg, [1, 2, 3], digits.scale, digits.shift), atol=1e-5)


def test_start_params_and_template_untouched(digits):
    xs, ys = _clients(digits, [10, 20])
    model = build_model("mlp", digits.input_shape, 10, (16,))
    before = get_params(model)
    start = get_params(model)
    train_batched(model, start, xs, ys, ONE_EPOCH, [0, 1], digits.scale, digits.shift)
    for k in before:
        assert torch.equal(start[k], before[k])
        assert torch.equal(model.state_dict()[k], before[k])


def test_rejects_mismatched_inputs_and_recurrent_models(digits):
    xs, ys = _clients(digits, [4, 4])
    model = build_model("mlp", digits.input_shape, 10, (8,))
    with pytest.raises(ValueError, match="one entry per client"):
        train_batched(model, get_params(model), xs, ys, ONE_EPOCH, [0], digits.scale, digits.shift)
    gru = build_model("gru", (8, 8), 10, (8,))
    assert not supports_batched(gru)
    with pytest.raises(BatchedTrainingError):
        train_batched(gru, get_params(gru), xs, ys, ONE_EPOCH, [0, 1], digits.scale, digits.shift)
    assert train_batched(model, get_params(model), [], [], ONE_EPOCH, [], 1.0) == []


def test_a_clients_update_does_not_depend_on_its_batch(digits):
    """Bit-identical whatever other clients share the batch (a retry after a fault trains a
    client in another batch): with one torch thread, as in worker actors, the MLP path computes
    each client on its own (with several threads the matmul's work split depends on the batch)."""
    from fedray.workers.batched import train_batched_stacked

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_batch_independence(digits, train_batched_stacked)
    finally:
        torch.set_num_threads(threads)


def _check_batch_independence(digits, train_batched_stacked):
    parts = partition(digits.y_train, 400, seed=0)
    ids = list(range(12))
    xs = [digits.x_train[parts.client(i)] for i in ids]
    ys = [digits.y_train[parts.client(i)] for i in ids]
    torch.manual_seed(3)
    model = build_model("mlp", digits.input_shape, 10, (64,))
    start = get_params(model)
    cfg = TrainConfig(local_epochs=2, batch_size=16, lr=0.1)
    full, _ = train_batched_stacked(model, start, xs, ys, cfg, ids, digits.scale, digits.shift)
    for i in (0, 5, 11):
        alone, _ = train_batched_stacked(model, start, [xs[i]], [ys[i]], cfg, [ids[i]], digits.scale, digits.shift)
        pair, _ = train_batched_stacked(model, start, xs[i:i + 2], ys[i:i + 2], cfg, ids[i:i + 2], digits.scale, digits.shift)
        for k in full:
            assert torch.equal(full[k][i], alone[k][0]) and torch.equal(full[k][i], pair[k][0])


def test_batching_pays_only_without_2d_convolutions(digits):
    from fedray.workers.batched import batching_pays

    assert batching_pays(build_model("mlp", digits.input_shape, 10, (16,)))
    assert not batching_pays(build_model("cnn", digits.input_shape, 10, (4, 8, 16)))  # compute-bound: one by one
    assert not batching_pays(build_model("gru", (9, 5), 10, (8,)))  # cannot be batched at all


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_padded_to_the_largest_client_equals_one_by_one(digits, momentum):
    """Clients smaller than a batch train in batches padded to the population's largest client
    (`pad_to`), not to the batch size: the same updates as one by one; a call whose clients do
    not all fit `pad_to` falls back to the batch size."""
    from fedray.workers.batched import _epoch_batches, population_pad, train_batched_stacked

    sizes = [1, 2, 5, 3, 1, 7]
    xs, ys = _clients(digits, sizes, seed=4)
    torch.manual_seed(2)
    model = build_model("mlp", digits.input_shape, 10, (64,))
    start = get_params(model)
    cfg = TrainConfig(local_epochs=2, batch_size=32, lr=0.1, momentum=momentum)
    seeds = [5 * i + 1 for i in range(len(sizes))]
    pad = population_pad(np.array(sizes + [4]), cfg.batch_size)
    assert pad == 7 and population_pad(np.array([3, 40]), 32) is None and population_pad(lambda ids: ids, 32) is None
    params, stats = train_batched_stacked(model, start, xs, ys, cfg, seeds, digits.scale, digits.shift, pad_to=pad)
    got = [({k: v[i] for k, v in params.items()}, st) for i, st in enumerate(stats)]
    _check_equal(got, _one_by_one(model, start, xs, ys, cfg, seeds, digits.scale, digits.shift), atol=1e-6)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    assert _epoch_batches(gens, sizes, offsets, 32, pad)[0].shape == (6, 1, 7)
    assert _epoch_batches(gens, sizes, offsets, 32, 4)[0].shape == (6, 1, 32)  # a client of 5 and 7 > 4


def test_padded_batches_do_not_depend_on_the_batch(digits):
    """With a job-wide `pad_to`, a client's update is still bit-identical whatever batch it trains in."""
    from fedray.workers.batched import train_batched_stacked

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_batch_independence(digits, lambda *a: train_batched_stacked(*a, pad_to=8))
    finally:
        torch.set_num_threads(threads)
