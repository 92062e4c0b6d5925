"""The Task API: user tasks run as simulated clients, arbitrary metrics reach the results,
batched and one-by-one training agree, and bad tasks fail with the field or client named."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fedray
from fedray.orchestrator.spec import JobSpec, SpecError, TaskSpec, TrainingSpec
from fedray.plugins import load_task, task_for_spec
from fedray.workers.batched import supports_batched, train_batched_stacked
from fedray.workers.client import TrainerSetup
from fedray.workers.data import as_arrays
from fedray.workers.step import ClientStep, client_seed
from fedray.workers.broadcast import make_broadcast
from fedray.workers.models import get_params
from fedray.compression import decode_checked, get_codec

ROOT = Path(__file__).resolve().parents[1]
CNN_DIR = ROOT / "examples" / "custom_cnn"


class Blobs(fedray.Task):
    """Four Gaussian blobs in 8-d; client k holds 20 + k points. `bad_client` raises in client_data."""

    def __init__(self, n: int = 12, bad_client: int | None = None) -> None:
        self.n, self.bad = n, bad_client

    def _points(self, seed: int, count: int):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (count,), generator=g)
        centers = torch.eye(8)[:4] * 3.0
        return centers[y] + torch.randn(count, 8, generator=g), y

    def model(self):
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def num_clients(self):
        return self.n

    def client_data(self, client_id):
        if client_id == self.bad:
            raise OSError(f"shard file for client {client_id} is missing")
        return torch.utils.data.TensorDataset(*self._points(1000 + client_id, 20 + client_id))

    def test_data(self):
        return torch.utils.data.TensorDataset(*self._points(7, 400))

    def evaluate(self, model, data):
        m = super().evaluate(model, data)
        x, y = data.tensors
        with torch.no_grad():
            top2 = model(x).topk(2, dim=1).indices
        return {**m, "top2": float((top2 == y[:, None]).any(1).float().mean())}


def _spec(**training) -> JobSpec:
    tr = dict(rounds=2, clients_per_round=4, local_epochs=2, batch_size=8, lr=0.1, min_clients=1)
    tr.update(training)
    return JobSpec(name="task-test", seed=3, training=TrainingSpec(**tr))


def test_user_task_metrics_reach_results_and_a_failing_client_is_named(ray_session, tmp_path):
    from fedray.orchestrator.engine import run_job
    from fedray.orchestrator.results import write_results

    spec = dataclasses.replace(_spec(clients_per_round=12), compression=dataclasses.replace(JobSpec().compression,
                                                                                          codec="identity"))
    logs: list[str] = []
    result = run_job(spec, task=Blobs(bad_client=5), progress=False, log=logs.append)
    assert [r.failed for r in result.rounds] == [1, 1]
    assert any("client 5, round 1, stage data: OSError: shard file for client 5 is missing" in m for m in logs), logs
    fm = result.final_metrics
    assert set(fm) >= {"accuracy", "loss", "top2"} and fm["top2"] >= fm["accuracy"] > 0.5
    assert result.summary()["final_metrics"] == fm and result.final_accuracy == fm["accuracy"]
    write_results(result, tmp_path)
    rows = json.loads((tmp_path / "rounds.json").read_text())
    assert rows[-1]["metrics"]["top2"] == fm["top2"]
    header = (tmp_path / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"metric_accuracy", "metric_loss", "metric_top2"} <= set(header)


def _setup(**kw) -> TrainerSetup:
    from fedray.workers.train import TrainConfig

    return TrainerSetup(job_id="j", secret="s", seed=11, train=TrainConfig(2, 8, 0.1, 0.5), codec="identity", **kw)


def test_batched_and_one_by_one_give_the_same_update():
    task = Blobs()
    step = ClientStep(_setup(), task, torch.device("cpu"))
    assert supports_batched(step.model) and not step.custom_train  # so ClientTrainer batches this task
    with torch.random.fork_rng():
        torch.manual_seed(0)
        start = get_params(task.model())
    bcast = make_broadcast(start, codec="identity", codec_params={}, round=1)
    cids = [0, 3, 7]
    arrays = [as_arrays(task.client_data(c)) for c in cids]
    stacked, _ = train_batched_stacked(step.model, start, [a[0] for a in arrays], [a[1] for a in arrays],
                                       step.setup.train, [client_seed(11, 1, c) for c in cids], None, 0.0)
    ident = get_codec("identity")
    for i, c in enumerate(cids):
        out = step.run(1, start, c, bcast)
        one = {k: decode_checked(ident, p) for k, p in out.tensors}
        for k in start:
            torch.testing.assert_close(one[k], stacked[k][i] - start[k], atol=1e-5, rtol=1e-4)


def test_buffers_turn_batching_off():
    sys.path.insert(0, str(CNN_DIR))
    try:
        task = load_task("cnn_task:FashionCNN", {"num_clients": 4, "per_client": 5})
    finally:
        sys.path.remove(str(CNN_DIR))
    assert not supports_batched(task.model())  # BatchNorm buffers: clients train one by one


def test_custom_cnn_runs_simulated(ray_session):
    from fedray.orchestrator.engine import run_job

    spec = JobSpec.from_yaml(CNN_DIR / "job.yaml")
    spec = dataclasses.replace(
        spec, task=TaskSpec(spec.task.target, {"num_clients": 20, "per_client": 40, "test_size": 500}),
        training=dataclasses.replace(spec.training, rounds=2, clients_per_round=4, local_epochs=1))
    result = run_job(spec, base_dir=str(CNN_DIR), progress=False, log=lambda m: None)
    assert [r.clients for r in result.rounds] == [4, 4] and all(r.failed == 0 for r in result.rounds)
    assert result.final_accuracy > 0.3  # 10 classes: chance is 0.1
    assert any(k.endswith("running_mean") for k in result.params)  # BatchNorm statistics are federated


def test_unimportable_target_names_task_target(tmp_path, capsys):
    from fedray.orchestrator.cli import main

    (tmp_path / "job.yaml").write_text("task: {target: 'no_such_module_xyz:Task'}\n")
    assert main(["validate", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "task.target" in err and "No module named 'no_such_module_xyz'" in err
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 2
    assert "task.target" in capsys.readouterr().err


def test_task_spec_and_checks():
    with pytest.raises(SpecError, match="task.params: set task.target"):
        JobSpec.from_dict({"task": {"params": {"a": 1}}})
    with pytest.raises(SpecError, match="task.target: no task named 'nope'.*fashion-mnist-mlp"):
        task_for_spec(JobSpec(task=TaskSpec("nope")))
    spec = JobSpec.from_dict({"task": {"target": "digits-mlp", "params": {"num_clients": 3}},
                              "training": {"clients_per_round": 5}})
    from fedray.api import prepare_task

    with pytest.raises(SpecError, match="training.clients_per_round: 5 is more than the 3 clients"):
        prepare_task(spec)
    with pytest.raises(SpecError, match="dropout: Blobs"):
        prepare_task(JobSpec.from_dict({"dropout": {"keep_rates": [0.5]}, "training": {"clients_per_round": 2}}),
                     Blobs())
