"""Faults on a real local Ray: worker actors and an aggregation shard killed while a job runs
change nothing: every round completes, no update is lost or counted twice, and the final model
is bit-identical to a fault-free run with the same seed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
import torch

from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import DataSpec, JobSpec, ResourceSpec, TrainingSpec


def _spec(checkpoint_dir=None, worker_reduce: bool = False) -> JobSpec:
    return JobSpec(
        name="faults", seed=11,
        data=DataSpec(dataset="digits", num_clients=40),
        training=TrainingSpec(rounds=4, clients_per_round=10, local_epochs=1, batch_size=16, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=2, shards=2, max_attempts=10, worker_reduce=worker_reduce),
        checkpoint_dir=checkpoint_dir,
    )


class _Killer:
    """Kills a random worker actor every `every_s` seconds (slower than an actor restarts, or no
    work could ever finish), and shard 1 once, after round 1."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.rt = None
        self.every_s = every_s
        self.kills = 0
        self.stop = threading.Event()
        self.rng = np.random.default_rng(0)

    def start(self, rt) -> None:
        self.rt = rt
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            pool = self.rt.pool
            if pool is None or not pool.actors:
                continue
            victim = pool.actors[int(self.rng.integers(len(pool.actors)))]
            try:  # kill only a started actor: killing replacements mid-start-up starves all work
                ray.get(victim.ping.remote(), timeout=30)
            except Exception:
                continue
            ray.kill(victim, no_restart=True)
            self.kills += 1

    def on_round(self, rec) -> None:
        if rec.round == 1:
            ray.kill(self.rt.shards.actors[1], no_restart=True)
            self.kills += 1


# worker_reduce: a retried call re-uploads its partial sums under the same identities; one
# committed before the worker died counts once (the clients and the model show any double count)
@pytest.mark.parametrize("worker_reduce", [False, True], ids=["per_client", "worker_reduce"])
def test_killed_workers_and_shard_change_nothing(ray_session, worker_reduce):
    clean = run_job(_spec(worker_reduce=worker_reduce), progress=False, log=lambda s: None)
    killer = _Killer()
    try:
        faulty = run_job(_spec(worker_reduce=worker_reduce), progress=False, log=lambda s: None, on_start=killer.start, on_round=killer.on_round)
    finally:
        killer.stop.set()
    assert killer.kills >= 2
    assert [r.clients for r in faulty.rounds] == [10, 10, 10, 10]
    assert [r.accuracy for r in faulty.rounds] == [r.accuracy for r in clean.rounds]
    for k in clean.params:
        assert torch.equal(faulty.params[k], clean.params[k]), k
