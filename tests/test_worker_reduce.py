"""`resources.worker_reduce`: workers upload one partial sum per shard and call instead of each
client's update. On a real local Ray with real gRPC shards and real training, the job's result
equals the per-client path's within float tolerance, with the same bytes up and clients; a call
retried after its worker died counts its clients once; the spec refuses what it cannot serve."""

from __future__ import annotations

import pytest
import torch

from fedray.api import prepare_task
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.service import AggregationCore, create_server
from fedray.orchestrator.spec import DataSpec, JobSpec, ResourceSpec, SpecError, StrategySpec, TrainingSpec
from fedray.proto import serde
from fedray.workers.broadcast import make_broadcast
from fedray.workers.client import ClientTrainer, TrainerSetup


def _spec(reduce: bool, strategy: str = "fedavg", **kw) -> JobSpec:
    return JobSpec(
        name="reduce", seed=5,
        data=DataSpec(dataset="digits", num_clients=40),
        training=TrainingSpec(rounds=3, clients_per_round=12, local_epochs=1, batch_size=16, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=3, shards=2, worker_reduce=reduce),
        strategy=StrategySpec(name=strategy, **({"server_momentum": 0.9} if strategy == "fedavgm" else {})), **kw,
    )


# fedavgm: a server optimizer on the merged sum. (FedAdam's m / (sqrt(v) + tau) turns the fp32
# rounding of a partial sum's mean, ~1e-7 relative, into a visible step on the odd coordinate
# whose update is near zero: measured 1 of 12,800 weights off by 2e-3, same accuracy.)
@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_partial_sums_equal_per_client_uploads(ray_session, strategy):
    quiet = dict(progress=False, log=lambda s: None)
    per_client = run_job(_spec(False, strategy), **quiet)
    reduced = run_job(_spec(True, strategy), **quiet)
    assert [r.clients for r in reduced.rounds] == [r.clients for r in per_client.rounds] == [12, 12, 12]
    assert [r.bytes_up for r in reduced.rounds] == [r.bytes_up for r in per_client.rounds]
    for k, want in per_client.params.items():
        got = reduced.params[k]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), k
        assert not torch.equal(want, torch.zeros_like(want)), k


def test_retried_call_counts_once():
    """A worker that died after its partial sums were committed: the pool retries the same call
    (attempt 1), which must neither fail nor add its clients a second time."""
    spec = _spec(True)
    task = prepare_task(spec)
    model = task.model()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    core = AggregationCore(job_id="j", secret="s", shapes=shapes, worker_reduce=True)
    server, port = create_server(core, "127.0.0.1:0")
    trainer = ClientTrainer(TrainerSetup.from_spec(spec, job_id="j", secret="s"), task)
    try:
        b = make_broadcast(params, codec="identity", codec_params={}, round=1)
        ids, servers = [3, 8, 11, 14, 21, 25, 30, 33, 36, 39], [f"127.0.0.1:{port}"]
        core.open_round(1, b)
        first = trainer.train_clients(1, b, ids, servers, attempt=0)
        again = trainer.train_clients(1, b, ids, servers, attempt=1)
        out = core.close_round(1)
        assert [r.error for r in first + again] == [None] * 20
        assert out["count"] == 10
        # the shard received one fp32 partial sum (4 bytes a value), not ten int8 updates
        assert 0 < out["bytes_received"] < sum(r.bytes_up for r in first) / 2
        assert out["total_weight"] == sum(r.examples for r in first)
        assert all(r.bytes_up > 0 for r in first + again)  # each client's own upload, not the partial sum
        # a fresh call (attempt 0) with the same clients is a second upload of the same identity
        core.open_round(2, b)
        trainer.train_clients(2, b, ids, servers, attempt=0)
        dup = trainer.train_clients(2, b, ids, servers, attempt=0)
        assert all(r.error and "ALREADY_EXISTS" in r.error for r in dup)
        assert core.close_round(2)["count"] == 10
        # the driver's early close (expect = the clients sent) closes the round on their count:
        # a retry that arrives after that close still answers "counted", not a failure
        core.open_round(3, b)
        first = trainer.train_clients(3, b, ids, servers, attempt=0)
        out = core.close_round(3, expect=10)
        again = trainer.train_clients(3, b, ids, servers, attempt=1)
        assert out["count"] == 10 and [r.error for r in first + again] == [None] * 20
    finally:
        trainer.close()
        server.stop(None)


def test_aggregate_identity_refused_without_worker_reduce():
    from fedray.proto.aggregate import aggregate_id
    from fedray.proto.auth import client_token
    from fedray.compression import get_codec

    core = AggregationCore(job_id="j", secret="s", shapes={"w": (2,)})
    server, port = create_server(core, "127.0.0.1:0")
    try:
        core.open_round(1)
        agg = aggregate_id(0, 0, 1)
        msgs = serde.encode_upload(job_id="j", round=1, client_id=agg, weight=5.0,
                                   tensors=[("w", get_codec("identity").encode(torch.ones(2)))])
        ch = serde.open_channel(f"127.0.0.1:{port}")
        with pytest.raises(Exception, match="reserved for workers' partial sums"):
            serde.call_upload(ch, msgs, token=client_token("s", "j", agg))
        ch.close()
    finally:
        server.stop(None)


@pytest.mark.parametrize("extra, named", [
    (dict(strategy=StrategySpec(name="median")), "needs every update"),
    (dict(strategy=StrategySpec(name="fedavg", clip_norm=1.0)), "strategy.clip_norm"),
    (dict(training=TrainingSpec(rounds=1, clients_per_round=4, client_eval=True)), "training.client_eval"),
])
def test_spec_refuses_what_partial_sums_cannot_serve(extra, named):
    d = dict(name="r", data=DataSpec(dataset="digits", num_clients=10),
             training=TrainingSpec(rounds=1, clients_per_round=4), resources=ResourceSpec(worker_reduce=True))
    d.update(extra)
    with pytest.raises(SpecError, match=r"resources\.worker_reduce.*" + named.replace(".", r"\.")):
        JobSpec(**d)


def test_int8_fold_many_equals_folding_one_by_one():
    """A worker folds all its clients' int8 payloads of a tensor at once (`Codec.fold_many`):
    bit for bit the float64 sum the shard's one-by-one `fold` gives, from a non-zero sum too;
    a bad scale is refused before anything is added."""
    from fedray.compression import get_codec

    codec = get_codec("int8")
    gen = torch.Generator().manual_seed(3)
    xs = {"w": torch.randn(9, 33, 7, generator=gen), "b": torch.randn(9, 5, generator=gen) * 1e-3}
    xs["b"][4] = 0.0  # a zero tensor: scale 0
    per = codec.encode_batch(xs)
    alphas = [float(a) for a in torch.randint(1, 60, (9,), generator=gen)]
    for k, ps in per.items():
        start = torch.randn(ps[0].shape, generator=gen, dtype=torch.float64).reshape(-1)
        one, many = start.clone(), start.clone()
        for p, a in zip(ps, alphas):
            codec.fold(p)(one, a)
        codec.fold_many(ps, alphas, many)
        assert torch.equal(one, many), k
    bad = bytearray(bytes(memoryview(per["b"][2].data)))
    bad[:4] = bytes(memoryview(torch.tensor([float("nan")]).numpy()))
    from dataclasses import replace

    from fedray.compression.payload import PayloadError

    acc = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(PayloadError, match="scales"):
        codec.fold_many([per["b"][0], replace(per["b"][2], data=bytes(bad))], [1.0, 1.0], acc)
    assert torch.equal(acc, torch.zeros(5, dtype=torch.float64))


def test_upload_nbytes_many_equals_each_upload():
    """The bytes each client is charged under `worker_reduce` equal its own upload's on the wire,
    whatever its id, weight and metrics, in one chunk or several."""
    from fedray.compression import get_codec

    per = get_codec("int8").encode_batch({"a": torch.randn(12, 40, 30), "c": torch.randn(12, 10)})
    clients = [(0, 1.0, {"loss": 0.5, "train_s": 1e-4}), (300, 2.0, {"loss": 0.0, "train_s": 0.0}),
               (2**40, 3.5, {"loss": float("nan"), "train_s": 2.0}), (127, 0.0, {"loss": 1.0}),
               (128, 1e300, {}), (5, 1.0, {"loss": -0.0, "train_s": 1.0}), (1, 1.0, {"loss": 0.5, "train_s": 1e-4}),
               (16383, 1.0, {"loss": 0.5, "train_s": 1e-4}),
               (16384, 1.0, {"loss": 0.5, "train_s": 1e-4}), (0, 1.0, {"train_s": 1e-4, "loss": 0.5}),
               (2, 1.0, {"loss": 0.0, "train_s": 1e-4}), (3, 1.0, {"loss": 0.25, "train_s": 1e-4})]
    for chunk in (serde.CHUNK_BYTES, 1000, 1204):
        got = serde.upload_nbytes_many(job_id="job-x", round=17, attempt=2, tensors=[(k, ps[0]) for k, ps in per.items()],
                                       clients=clients, chunk_bytes=chunk)
        want = [serde.encode_upload(job_id="job-x", round=17, client_id=cid, weight=w, attempt=2, metrics=m,
                                    tensors=[(k, ps[i]) for k, ps in per.items()], chunk_bytes=chunk).nbytes
                for i, (cid, w, m) in enumerate(clients)]
        assert got == want, chunk


@pytest.mark.parametrize("codec_name,big", [("int8", False), ("int8", True), ("identity", False), ("fp16", False)])
@pytest.mark.parametrize("num_shards", [1, 3])
def test_encode_fold_equals_encode_then_fold(codec_name, big, num_shards):
    """`partial_sums_encoded` (`Codec.encode_fold_batch`: int8 sums straight from its codes, no
    per-client payload) gives bit for bit the sums, weights and losses of `encode_batch` then
    `partial_sums_many`, and the payload templates of client 0; zero and large tensors too
    (the latter take the general path)."""
    from fedray.compression import get_codec
    from fedray.workers.reduce import partial_sums_encoded, partial_sums_many

    codec = get_codec(codec_name)
    gen = torch.Generator().manual_seed(11)
    b = 13
    xs = {"w": torch.randn(b, 17, 6, generator=gen), "b": torch.randn(b, 6, generator=gen) * 1e-3,
          "big": torch.randn(b, 300_000 if big else 10, generator=gen)}
    xs["b"][5] = 0.0
    cids = [int(c) for c in torch.randperm(500, generator=gen)[:b]]
    weights = [float(w) for w in torch.randint(1, 9, (b,), generator=gen)]
    losses = [0.5 * i for i in range(b)]
    losses[3] = float("nan")
    per = codec.encode_batch(xs)
    want = partial_sums_many(codec, cids, weights, losses, per, num_shards)
    templates, got = partial_sums_encoded(codec, cids, weights, losses, xs, num_shards)
    assert sorted(got) == sorted(want)
    for shard, w in want.items():
        g = got[shard]
        assert g.clients == w.clients and g.weight == w.weight and g.loss == w.loss and g.acc.count == w.acc.count
        for k in xs:
            assert g.sums[k].dtype == torch.float64 and torch.equal(g.sums[k], w.sums[k]), (shard, k)
    for k, p in templates.items():
        assert (p.codec, p.dtype, p.shape, dict(p.params)) == (per[k][0].codec, per[k][0].dtype, per[k][0].shape,
                                                               dict(per[k][0].params))
        assert bytes(memoryview(p.data)) == bytes(memoryview(per[k][0].data)), k


def test_encode_fold_refuses_a_diverged_update():
    from fedray.compression import get_codec
    from fedray.compression.payload import PayloadError
    from fedray.workers.reduce import partial_sums_encoded

    xs = {"w": torch.randn(3, 4, 5)}
    xs["w"][1, 0, 0] = float("nan")
    with pytest.raises(PayloadError, match="scales"):
        partial_sums_encoded(get_codec("int8"), [1, 2, 3], [1.0, 1.0, 1.0], [0.0] * 3, xs, 1)
    with pytest.raises(ValueError, match="weight"):
        partial_sums_encoded(get_codec("int8"), [1, 2, 3], [1.0, 0.0, 1.0], [0.0] * 3, {"w": torch.randn(3, 4)}, 1)
