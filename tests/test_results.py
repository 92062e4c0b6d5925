"""The results directory writer, the result log line, token lookup and the example specs: pure,
no Ray cluster."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fedray.orchestrator.client import RESULT_MARKER, auth_token, format_result_line
from fedray.orchestrator.engine import JobResult, RoundRecord
from fedray.orchestrator.results import (FP32_LABEL, RESULT_FILES, accuracy_vs_bytes_figure, load_results,
                                         round_rows, write_results)
from fedray.orchestrator.spec import JobSpec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def _result() -> JobResult:
    spec = JobSpec.from_dict({"name": "t", "data": {"dataset": "digits", "num_clients": 10},
                              "training": {"rounds": 2, "clients_per_round": 4}})
    recs = [
        RoundRecord(round=r, clients=4, failed=0, accuracy=0.25 * r, loss=1.0 / r, bytes_up=100 * r,
                    bytes_down=400, bytes_up_fp32=400, bytes_down_fp32=400, wall_s=0.5, train_loss=0.9,
                    metrics={"accuracy": 0.25 * r, "loss": 1.0 / r, **({"f1": 0.3} if r == 2 else {})})
        for r in (1, 2)
    ]
    params = {"0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "0.bias": torch.tensor([1.0, -1.0])}
    return JobResult(job_id="t-0001", spec=spec, rounds=recs, wall_s=2.0, params=params)


def test_write_results_writes_every_file(tmp_path):
    res = _result()
    files = write_results(res, tmp_path / "out")
    assert sorted(files) == sorted(RESULT_FILES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(RESULT_FILES)
    assert json.loads(files["summary.json"].read_text()) == res.summary()
    rows = json.loads(files["rounds.json"].read_text())
    assert [r["bytes_up"] for r in rows] == [100, 200] and rows[1]["accuracy"] == 0.5
    with files["rounds.csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in csv_rows] == [1, 2] and float(csv_rows[1]["accuracy"]) == 0.5
    # metrics become one metric_<name> column each (the union over rounds, empty where missing)
    assert set(csv_rows[0]) == (set(rows[0]) - {"metrics"}) | {"metric_accuracy", "metric_loss", "metric_f1"}
    assert csv_rows[0]["metric_f1"] == "" and float(csv_rows[1]["metric_f1"]) == 0.3
    state = torch.load(files["model.pt"], weights_only=True)
    assert all(torch.equal(state[k], res.params[k]) for k in res.params) and set(state) == set(res.params)
    for name in ("accuracy.png", "accuracy_vs_bytes.png", "bytes_per_round.png", "metrics.png"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_accuracy_vs_bytes_has_the_fp32_reference_line():
    rows = round_rows(_result().rounds)
    fig = accuracy_vs_bytes_figure(rows, codec="int8")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"sent (int8)", FP32_LABEL}
    # Same accuracy curve; x is cumulative MB: sent 500 then 1100 bytes, fp32 800 then 1600.
    assert list(lines[FP32_LABEL].get_ydata()) == list(lines["sent (int8)"].get_ydata()) == [0.25, 0.5]
    assert list(lines["sent (int8)"].get_xdata()) == pytest.approx([500e-6, 1100e-6])
    assert list(lines[FP32_LABEL].get_xdata()) == pytest.approx([800e-6, 1600e-6])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sent (int8)", FP32_LABEL]
    assert ax.get_legend()._loc == 0  # "best": matplotlib places it where it covers the least data


def test_load_results_round_trips(tmp_path):
    res = _result()
    write_results(res, tmp_path, plots=False)
    back = load_results(tmp_path)
    assert back["summary"]["final_accuracy"] == 0.5 and len(back["rounds"]) == 2
    assert torch.equal(back["model"]["0.weight"], res.params["0.weight"])
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "missing")


def test_result_line_is_one_parseable_line():
    line = format_result_line(_result().summary(), results_dir="/r/job")
    assert line.startswith(RESULT_MARKER) and "\n" not in line
    got = json.loads(line[len(RESULT_MARKER):])
    assert got["results_dir"] == "/r/job" and got["rounds"][1]["round"] == 2 and got["spec"]["name"] == "t"


def test_auth_token_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert auth_token() == "home-token"
    (tmp_path / "tok").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token() == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert auth_token() == "env-token"
    assert auth_token("explicit") == "explicit"


def test_examples_are_valid_specs():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "fashion-mnist-int8.yaml", "fashion-mnist-fp32.yaml", "digits-dirichlet.yaml"} <= names
    for p in EXAMPLES:
        spec = JobSpec.from_yaml(p)
        assert spec.compression.codec in ("identity", "int8"), p
    quick = JobSpec.from_yaml(EXAMPLES[[p.name for p in EXAMPLES].index("quickstart.yaml")])
    assert quick.data.dataset == "digits"  # bundled with scikit-learn: runs anywhere
