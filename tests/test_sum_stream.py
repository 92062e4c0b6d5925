"""A shard's closed running sum sent as float32 pieces of the mean (orchestrator/sum_stream.py):
the same numbers as `RunningWeightedSum.mean()`, and on a real Ray shard actor, pieces that
travel inline (the shard writes nothing of the sum into the object store)."""

import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from fedray.orchestrator.aggregation import RunningWeightedSum
from fedray.orchestrator.shard import AggregationShard
from fedray.orchestrator.sum_stream import STREAM_MIN_BYTES, piece_elements, pieces, receive

SHAPES = {"w": (37, 29), "b": (1000,), "e": (0,)}


def _sum(rng, n):
    agg = RunningWeightedSum(SHAPES)
    for _ in range(n):
        agg.add({k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()},
                float(rng.integers(1, 50)))
    return agg


def _empty():
    return {k: torch.full(s, float("nan")) for k, s in SHAPES.items()}


def test_pieces_give_the_running_sums_mean_bit_for_bit():
    agg = _sum(np.random.default_rng(0), 7)
    out = _empty()
    got = receive(pieces(agg.sums, agg.total_weight, 512), out, add=False)
    assert got == sum(int(np.prod(s)) for s in SHAPES.values())
    for k, want in agg.mean().items():
        assert torch.equal(out[k], want), k


def test_two_shards_shares_add_up_to_the_merged_mean():
    rng = np.random.default_rng(1)
    a, b = _sum(rng, 5), _sum(rng, 3)
    total = a.total_weight + b.total_weight
    out = _empty()
    receive(pieces(a.sums, total, 512), out, add=False)
    receive(pieces(b.sums, total, 512), out, add=True)
    a.merge(b)
    for k, want in a.mean().items():
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)


def test_a_piece_outside_the_model_and_a_zero_weight_are_refused():
    with pytest.raises(ValueError, match="'b' at 999"):
        receive(iter([("b", 999, np.zeros(2, np.float32))]), _empty(), add=False)
    with pytest.raises(ValueError, match="'x'"):
        receive(iter([("x", 0, np.zeros(1, np.float32))]), _empty(), add=False)
    with pytest.raises(ValueError, match="total_weight"):
        next(pieces(_sum(np.random.default_rng(2), 1).sums, 0.0, 512))


def _shm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    return 0


def test_shard_actor_streams_its_sum_inline_and_frees_it(ray_session):
    small = AggregationShard.remote(job_id="small", secret="s", shapes={"w": (1000,)})
    ray.get(small.open_round.remote(1, None))
    part = ray.get(small.close_round.remote(1))  # a small model's sum comes back whole, as before
    assert not part.get("streamed") and isinstance(part["agg"], RunningWeightedSum)
    ray.kill(small)
    numel = STREAM_MIN_BYTES // 4  # 16 MiB of float32 pieces
    shard = AggregationShard.remote(job_id="stream", secret="s", shapes={"w": (numel,)})
    pid = ray.get(shard.__ray_call__.remote(lambda self: os.getpid()))
    ray.get(shard.open_round.remote(1, None))
    part = ray.get(shard.close_round.remote(1))
    assert part["streamed"] and part["agg"] is None and part["sum_count"] == 0 and part["shapes"] == {"w": (numel,)}
    shm = _shm_kib(pid)
    out = {"w": torch.full((numel,), float("nan"))}
    gen = shard.stream_sum.options(num_returns="streaming").remote(1, 2.0)
    sizes = []

    def items():
        for ref in gen:
            k, a, x = ray.get(ref)
            sizes.append(x.nbytes)
            yield k, a, x

    assert receive(items(), out, add=False) == numel and not out["w"].any()
    assert max(sizes) == 4 * piece_elements() < 100 * 1024  # under Ray's inline limit
    assert _shm_kib(pid) - shm < 4096, "the sum went through the object store"
    ray.get(shard.release_round.remote(1))
    with pytest.raises(ray.exceptions.RayTaskError, match="no closed running sum"):
        for ref in shard.stream_sum.options(num_returns="streaming").remote(1, 2.0):
            ray.get(ref)
    ray.get(shard.stop.remote())
    ray.kill(shard)


def test_a_streamed_job_over_two_shards_matches_one_shard(ray_session):
    from fedray.orchestrator.engine import run_job
    from fedray.orchestrator.spec import DataSpec, JobSpec, ModelSpec, ResourceSpec, TrainingSpec

    def spec(shards: int) -> JobSpec:  # 4.3M parameters (17 MB fp32): over STREAM_MIN_BYTES
        return JobSpec(name="stream", seed=3, data=DataSpec(dataset="digits", num_clients=12),
                       model=ModelSpec(kind="mlp", hidden=(2048, 2048)),
                       training=TrainingSpec(rounds=2, clients_per_round=4, local_epochs=1, batch_size=32, lr=0.05),
                       resources=ResourceSpec(num_workers=2, shards=shards))

    one, two = (run_job(spec(n), progress=False, log=lambda s: None) for n in (1, 2))
    assert 4 * sum(v.numel() for v in one.params.values()) >= STREAM_MIN_BYTES
    assert [r.clients for r in one.rounds] == [r.clients for r in two.rounds] == [4, 4]
    for k, v in one.params.items():
        torch.testing.assert_close(two.params[k], v, rtol=1e-4, atol=1e-5)  # round 2 trains on float32-rounded sums
    assert one.rounds[-1].accuracy > one.rounds[0].accuracy - 0.05
