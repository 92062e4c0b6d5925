"""End to end on a real local Ray: workers train real torch models on real data, updates travel
through the gRPC aggregation service."""

from __future__ import annotations

import json

import torch

from fedray.orchestrator import cli
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import CompressionSpec, DataSpec, JobSpec, ResourceSpec, TrainingSpec

SUMMARY_KEYS = {"final_accuracy", "wall_s", "bytes_up_total", "bytes_down_total", "bytes_up_fp32", "bytes_down_fp32", "rounds"}
ROUND_KEYS = {"round", "clients", "accuracy", "bytes_up", "bytes_down", "wall_s"}


def _spec(seed=0, codec="int8", rounds=3) -> JobSpec:
    return JobSpec(
        name="t", seed=seed,
        data=DataSpec(dataset="digits", num_clients=60, partition="dirichlet", alpha=1.0),
        training=TrainingSpec(rounds=rounds, clients_per_round=12, local_epochs=2, batch_size=16, lr=0.1),
        compression=CompressionSpec(codec=codec),
        resources=ResourceSpec(num_workers=2, clients_per_call=4),
    )


def test_short_job_learns_and_is_reproducible(ray_session):
    a = run_job(_spec(seed=7), progress=False, log=lambda s: None)
    assert a.final_accuracy > 0.5, a.final_accuracy  # chance is 0.1
    assert [r.clients for r in a.rounds] == [12, 12, 12] and all(r.failed == 0 for r in a.rounds)
    s = a.summary()
    assert s["bytes_up_total"] < 0.3 * s["bytes_up_fp32"]  # int8 plus scales and framing
    b = run_job(_spec(seed=7), progress=False, log=lambda s: None)
    assert [r.accuracy for r in a.rounds] == [r.accuracy for r in b.rounds]
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    c = run_job(_spec(seed=8, rounds=1), progress=False, log=lambda s: None)
    assert not all(torch.equal(a.params[k], c.params[k]) for k in a.params)


def test_cli_demo_writes_the_json_contract(ray_session, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = cli.main(["demo", "--dataset", "digits", "--clients", "40", "--clients-per-round", "8", "--rounds", "2",
                   "--local-epochs", "1", "--batch-size", "32", "--lr", "0.1", "--hidden", "32,16",
                   "--partition", "iid", "--codec", "identity", "--seed", "3", "--json", str(out), "--quiet"])
    assert rc == 0
    s = json.loads(out.read_text())
    assert SUMMARY_KEYS <= set(s)
    assert [set(r) >= ROUND_KEYS for r in s["rounds"]] == [True, True]
    # identity: bytes up are the fp32 values plus a little protobuf framing
    assert s["bytes_up_fp32"] <= s["bytes_up_total"] < 1.05 * s["bytes_up_fp32"]  # framing of a 2.9k-param model
    assert s["bytes_down_total"] == s["bytes_down_fp32"]
    assert "final accuracy" in capsys.readouterr().out


def test_cli_run_yaml_and_bad_spec(ray_session, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(_spec(rounds=1).to_yaml())
    out = tmp_path / "r.json"
    assert cli.main(["run", str(job), "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["rounds"][0]["clients"] == 12
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {rounds: 0}\n")
    assert cli.main(["run", str(bad)]) == 2
    assert "training.rounds" in capsys.readouterr().err
