"""Experiment tracking in real jobs: TensorBoard event files read back with tensorboard's own
event reader, MLflow runs read back through MLflow's client API, from a local file store and from
a real `mlflow server` on 127.0.0.1 (started here, stopped by its own process group id)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fedray.orchestrator import cli
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import JobSpec, SpecError, TrackingSpec
from fedray.orchestrator.tracking import Tracker, TrackingError

pytest.importorskip("tensorboard", reason="tensorboard is a test dependency (scripts/setup.sh test)")
pytest.importorskip("mlflow", reason="mlflow is a test dependency (scripts/setup.sh test)")

BIN = Path(sys.executable).parent
JOB = {
    "name": "tracked", "seed": 3,
    "data": {"dataset": "digits", "num_clients": 40},
    "model": {"kind": "mlp", "hidden": [32]},
    "training": {"rounds": 3, "clients_per_round": 8, "local_epochs": 1, "batch_size": 16, "lr": 0.2},
    "resources": {"num_workers": 2, "clients_per_call": 4},
    "privacy": {"noise_multiplier": 0.5, "clip_norm": 5.0},
    "population": {"over_select": 1.25},
}
# What every round must carry, in both backends.
WANT = {"accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "compression_ratio_up", "compression_ratio_down",
        "epsilon", "virtual_s", "wall_s", "elapsed_s", "clients", "failed"}


def test_tracking_spec_errors_name_the_field():
    with pytest.raises(SpecError, match=r"tracking: set tracking.tensorboard_dir, tracking.mlflow_uri"):
        JobSpec.from_dict({"tracking": {}})
    with pytest.raises(SpecError, match=r"tracking.mlflow_uri: must be a string"):
        JobSpec.from_dict({"tracking": {"mlflow_uri": 5}})
    with pytest.raises(SpecError, match=r"tracking.tensorboard_dir: must be a non-empty string"):
        JobSpec.from_dict({"tracking": {"tensorboard_dir": ""}})
    with pytest.raises(SpecError, match=r"tracking.tensorboard: unknown field"):
        JobSpec.from_dict({"tracking": {"tensorboard": "x"}})
    spec = JobSpec.from_dict({"tracking": {"mlflow_uri": "file:runs/mlruns"}})
    assert JobSpec.from_dict(spec.to_dict()) == spec and spec.tracking.tensorboard_dir is None


def test_unreachable_mlflow_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spec = JobSpec(tracking=TrackingSpec(mlflow_uri="http://127.0.0.1:9"))  # port 9: nothing listens
    with pytest.raises(TrackingError, match=r"tracking.mlflow_uri: cannot open an MLflow run at 'http://127.0.0.1:9'"):
        with Tracker(spec, job_id="j"):
            pass


def _scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_cli_run_writes_tensorboard_and_mlflow_file_store(ray_session, mlflow_server, tmp_path, capsys):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(JOB))
    tb, store, out = tmp_path / "tb", tmp_path / "mlruns", tmp_path / "summary.json"
    rc = cli.main(["run", str(spec_file), "--quiet", "--json", str(out), "--tensorboard", str(tb),
                   "--mlflow", f"file:{store}"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(out.read_text())
    rounds, job_id = summary["rounds"], summary["job_id"]

    # TensorBoard: one run folder per job id; every metric at steps 1..3 with the summary's values.
    scalars = _scalars(tb / job_id)
    assert WANT <= set(scalars), sorted(WANT - set(scalars))
    for tag in ("accuracy", "loss", "bytes_up", "bytes_down", "epsilon", "virtual_s", "wall_s"):
        assert [e.step for e in scalars[tag]] == [1, 2, 3]
        assert [e.value for e in scalars[tag]] == pytest.approx([r[tag] for r in rounds], rel=1e-6), tag
    ratio = [r["bytes_up_fp32"] / r["bytes_up"] for r in rounds]
    assert [e.value for e in scalars["compression_ratio_up"]] == pytest.approx(ratio, rel=1e-6)
    assert all(3.5 < x < 4.1 for x in ratio)  # int8 against fp32
    eps = [e.value for e in scalars["epsilon"]]
    assert 0 < eps[0] < eps[1] < eps[2]
    elapsed = [e.value for e in scalars["elapsed_s"]]
    assert 0 < elapsed[0] < elapsed[1] < elapsed[2]

    # MLflow: the experiment is the job's name, the run the job id, FINISHED, spec as params.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == job_id and run.info.status == "FINISHED"
    assert run.data.params["privacy.noise_multiplier"] == "0.5" and run.data.params["data.dataset"] == "digits"
    assert WANT <= set(run.data.metrics), sorted(WANT - set(run.data.metrics))
    for tag in ("accuracy", "epsilon", "bytes_up", "virtual_s"):
        hist = client.get_metric_history(run.info.run_id, tag)
        assert [m.step for m in hist] == [r["round"] for r in rounds]
        assert [m.value for m in hist] == pytest.approx([r[tag] for r in rounds], rel=1e-9), tag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (file store) in its own process group."""

    def __init__(self, folder: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self._log_path = folder / "mlflow-server.log"
        self._log = open(self._log_path, "w")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
             "--workers", "1", "--backend-store-uri", (folder / "store").as_uri(),
             "--default-artifact-root", str(folder / "artifacts")],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "DO_NOT_TRACK": "true"},
        )

    def wait_ready(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {self._log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started when the module's first test asks for it, so it boots (15-60 s on a busy 2-core
    machine) while that test's job runs."""
    server = _MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


def test_job_logs_to_a_real_mlflow_server(ray_session, mlflow_server):
    url = mlflow_server.wait_ready()
    spec = JobSpec.from_dict({**JOB, "name": "tracked-server", "training": {**JOB["training"], "rounds": 2},
                              "tracking": {"mlflow_uri": url, "mlflow_experiment": "fedray-tests"}})
    res = run_job(spec, progress=False, log=lambda s: None)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("fedray-tests").experiment_id],
                              filter_string=f"tags.`fedray.job_id` = '{res.job_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert WANT <= set(run.data.metrics)
    acc = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in acc] == [1, 2]
    assert [m.value for m in acc] == pytest.approx([r.accuracy for r in res.rounds], rel=1e-9)
    assert run.data.metrics["epsilon"] == pytest.approx(res.rounds[-1].epsilon)
    assert not math.isnan(run.data.metrics["loss"])
