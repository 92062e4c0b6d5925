"""Experiment tracking: every round's metrics to TensorBoard event files and to MLflow.

Set by the job spec's `tracking:` section (or `fedray run/demo --tensorboard DIR --mlflow URI`):

    tracking:
      tensorboard_dir: runs/tb          # event files in runs/tb/<job id>/ (`tensorboard --logdir runs/tb`)
      mlflow_uri: file:runs/mlruns      # a local store, no server; or http://host:5000 (`mlflow server`)
      mlflow_experiment: null           # default: the job's name

Each round writes, at step = round number: accuracy, loss, train_loss, client_eval_accuracy and
client_eval_loss (when clients evaluate), bytes_up, bytes_down and their fp32 equivalents,
compression_ratio_up / _down (fp32 bytes over wire bytes), epsilon (with `privacy:`), virtual_s
(with `population:`), wall_s (the round), elapsed_s (since the job started), clients, failed,
keep_rate, sparsity, client_flops, param_memory_bytes; every other number a round record carries
too, so new metrics appear without changes here. An MLflow run is named after the job id, carries
the spec as parameters and ends FINISHED, FAILED or KILLED with the job.

The writers run in the job driver (on the cluster for submitted jobs: the folder or URI must be
reachable from there). tensorboard and mlflow-skinny are optional (`pip install 'fedray[tracking]'`)
and imported only when tracking is on. A backend that fails in the middle of a job is logged once
and dropped; the job goes on.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["Tracker", "TrackingError", "round_metrics"]

_INSTALL_HINT = "install the tracking extras: pip install 'fedray[tracking]' (tensorboard, mlflow-skinny)"


class TrackingError(RuntimeError):
    """A tracking backend could not be opened; the message names the backend and what to change."""


def round_metrics(rec: Any) -> dict[str, float]:
    """The numbers of one round record (a dataclass such as engine.RoundRecord), by metric name.

    None values and lists are left out; nested mappings of numbers are flattened as `outer/inner`.
    """
    out: dict[str, float] = {}

    def add(name: str, v: Any) -> None:
        if isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, (int, float)):
            out[name] = float(v)
        elif isinstance(v, Mapping):
            for k, x in v.items():
                add(f"{name}/{k}", x)

    for f in dataclasses.fields(rec):
        if f.name != "round":
            add(f.name, getattr(rec, f.name))
    for d in ("up", "down"):
        wire, fp32 = out.get(f"bytes_{d}"), out.get(f"bytes_{d}_fp32")
        if wire and fp32:
            out[f"compression_ratio_{d}"] = fp32 / wire
    return out


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, folder: str, job_id: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrackingError(f"tracking.tensorboard_dir: tensorboard is not installed; {_INSTALL_HINT}") from e
        self.path = Path(folder) / job_id
        try:
            self._w = SummaryWriter(log_dir=str(self.path), flush_secs=10)
        except OSError as e:
            raise TrackingError(f"tracking.tensorboard_dir: cannot write to {folder!r}: {e}") from e

    def log(self, step: int, metrics: Mapping[str, float], walltime: float) -> None:
        for k, v in metrics.items():
            self._w.add_scalar(k, v, global_step=step, walltime=walltime)
        self._w.flush()  # a round is seconds long: its numbers are on disk before the next one

    def close(self, status: str) -> None:
        self._w.close()


def _mlflow_uri(uri: str) -> str:
    """A plain path becomes a file: URI; file: URIs are made absolute (the store is a folder)."""
    if "://" not in uri and not uri.startswith(("file:", "sqlite:", "databricks")):
        return Path(uri).resolve().as_uri()
    if uri.startswith("file:") and not uri.startswith("file://"):
        return Path(uri[len("file:"):]).resolve().as_uri()
    return uri


class _MLflow:
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, job_id: str, params: Mapping[str, Any]) -> None:
        self.uri = _mlflow_uri(uri)
        if self.uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked; it is the store that needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # MLflow's HTTP client retries for minutes by default; a wrong URI should fail in seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param
        except ImportError as e:
            raise TrackingError(f"tracking.mlflow_uri: mlflow is not installed; {_INSTALL_HINT}") from e
        self._Metric = Metric
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=job_id, tags={"fedray.job_id": job_id})
            self.run_id = run.info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as e:  # MlflowException, connection errors: all mean the same here
            raise TrackingError(f"tracking.mlflow_uri: cannot open an MLflow run at {self.uri!r}: "
                                f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}") from e

    def log(self, step: int, metrics: Mapping[str, float], walltime: float) -> None:
        ms = int(walltime * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, v, ms, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """The tracking backends of one job. Use as a context manager around the round loop:

        with Tracker(spec, job_id=job_id) as t:
            run(on_round=t.on_round)

    Raises:
        TrackingError: (on entering) a backend's package is missing, its folder cannot be written
            or its MLflow server cannot be reached.
    """

    def __init__(self, spec, *, job_id: str, log: Callable[[str], None] = print) -> None:
        self._spec, self._job_id, self._log = spec, job_id, log
        self._backends: list = []
        self._t0 = time.perf_counter()

    def __enter__(self) -> "Tracker":
        tr = self._spec.tracking
        try:
            if tr.tensorboard_dir:
                self._backends.append(_TensorBoard(tr.tensorboard_dir, self._job_id))
            if tr.mlflow_uri:
                self._backends.append(_MLflow(tr.mlflow_uri, tr.mlflow_experiment or self._spec.name,
                                              self._job_id, _flatten(self._spec.to_dict())))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        for b in self._backends:
            try:
                b.close(status)
            except Exception as e:  # closing must not hide the job's own error
                self._log(f"tracking: closing {b.name} failed: {e}")
        self._backends = []

    def on_round(self, rec: Any) -> None:
        """Write one round's metrics to every backend (the engine's per-round callback)."""
        metrics = {**round_metrics(rec), "elapsed_s": time.perf_counter() - self._t0}
        now = time.time()
        for b in list(self._backends):
            try:
                b.log(rec.round, metrics, now)
            except Exception as e:
                self._log(f"tracking: {b.name} failed at round {rec.round} ({e}); no more rounds go to it")
                self._backends.remove(b)

    def chain(self, on_round: Callable[[Any], None] | None) -> Callable[[Any], None]:
        """A per-round callback that tracks the round, then calls `on_round` (if any)."""
        def both(rec: Any) -> None:
            self.on_round(rec)
            if on_round is not None:
                on_round(rec)
        return both
