"""Round r+1 is sent out before round r's evaluation and record (`JobRuntime._pipelines`): the
job's results are the same as one round after the other, and the rounds' walls do not overlap."""

from __future__ import annotations

import time

import torch

from fedray.orchestrator import engine
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import DataSpec, JobSpec, ResourceSpec, TrainingSpec


def _spec() -> JobSpec:
    return JobSpec(
        name="pipelined", seed=3,
        data=DataSpec(dataset="digits", num_clients=60),
        training=TrainingSpec(rounds=4, clients_per_round=12, local_epochs=1, batch_size=16, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=4, shards=2, worker_reduce=True),
    )


def test_pipelined_rounds_give_the_same_job(ray_session, monkeypatch):
    sent, now = [], []
    dispatch, round_ = engine.JobRuntime._dispatch, engine.JobRuntime._round

    def spy_round(self, r):
        now.append(r)
        return round_(self, r)

    def spy_dispatch(self, r):  # (round sent, round being run when it was sent)
        sent.append((r, now[-1]))
        return dispatch(self, r)

    monkeypatch.setattr(engine.JobRuntime, "_round", spy_round)
    monkeypatch.setattr(engine.JobRuntime, "_dispatch", spy_dispatch)
    t0 = time.perf_counter()
    piped = run_job(_spec(), progress=False, log=lambda s: None)
    elapsed = time.perf_counter() - t0
    assert sent == [(1, 1), (2, 1), (3, 2), (4, 3)]  # rounds 2-4 went out during their predecessor
    monkeypatch.setattr(engine.JobRuntime, "_pipelines", lambda self: False)
    plain = run_job(_spec(), progress=False, log=lambda s: None)
    assert [x.accuracy for x in piped.rounds] == [x.accuracy for x in plain.rounds]
    assert [(x.clients, x.bytes_up, x.bytes_down) for x in piped.rounds] == [(x.clients, x.bytes_up, x.bytes_down)
                                                                             for x in plain.rounds]
    for k, v in plain.params.items():
        assert torch.equal(piped.params[k], v), k
    assert sum(x.wall_s for x in piped.rounds) <= elapsed  # contiguous walls: no time counted twice
