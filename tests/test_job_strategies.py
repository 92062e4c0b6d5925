"""Strategies and differential privacy inside real jobs (real Ray, real gRPC shards)."""

from __future__ import annotations

from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import DataSpec, DPSpec, JobSpec, ResourceSpec, StrategySpec, TrainingSpec


def _spec(**kw) -> JobSpec:
    return JobSpec(
        name="strat", seed=5,
        data=DataSpec(dataset="digits", num_clients=40),
        training=TrainingSpec(rounds=2, clients_per_round=8, local_epochs=2, batch_size=16, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=4, shards=2),
        **kw,
    )


def test_robust_and_adaptive_strategies_run_over_two_shards(ray_session):
    for strat in (StrategySpec(name="median"), StrategySpec(name="fedadam", server_lr=0.05)):
        res = run_job(_spec(strategy=strat), progress=False, log=lambda s: None)
        assert [r.clients for r in res.rounds] == [8, 8]
        assert res.final_accuracy > 0.2, (strat.name, res.final_accuracy)


def test_dp_job_reports_growing_epsilon(ray_session):
    res = run_job(_spec(privacy=DPSpec(noise_multiplier=1.0, clip_norm=1.0)), progress=False, log=lambda s: None)
    eps = [r.epsilon for r in res.rounds]
    assert eps[0] is not None and 0 < eps[0] < eps[1]


def test_client_side_evaluation_is_aggregated_by_examples(ray_session):
    spec = _spec()
    spec = spec.replace(training=spec.training.replace(client_eval=True))
    res = run_job(spec, progress=False, log=lambda s: None)
    r1, r2 = res.rounds
    # round 1's clients evaluated the random initial model; round 2's the trained one
    assert r1.client_eval_accuracy is not None and 0 <= r1.client_eval_accuracy < 0.4
    assert r2.client_eval_accuracy > r1.client_eval_accuracy + 0.2
    assert r2.client_eval_loss < r1.client_eval_loss
    off = run_job(_spec(), progress=False, log=lambda s: None)
    assert off.rounds[0].client_eval_accuracy is None
