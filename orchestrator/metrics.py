"""fedray's Ray metrics, declared once with fixed low-cardinality tags (never per client).

They appear on Ray's metrics export port with a `ray_` prefix (e.g. `ray_fedray_rounds_total`).

Ray drops a process's gauges when the process exits (and, in Ray 2.60, when they have not been set
for two report intervals), so gauges set by the job driver (accuracy, round, ...) vanished with
the job. The metrics are therefore set by one long-lived actor per
cluster, `fedray_metrics_v1` in namespace `fedray` (detached, no CPU, about 50 MB): the driver
sends it each round's numbers, and a finished job's last values stay on the metrics port (and
in Prometheus) until the cluster stops or the next job of the same name overwrites them. The
series carry the actor's WorkerId instead of the driver's, one set for all jobs of a cluster.
"""

from __future__ import annotations

import math
import threading
import time
from functools import lru_cache

__all__ = ["EXPORTER_NAME", "EXPORTER_NAMESPACE", "JobMetrics"]

EXPORTER_NAME = "fedray_metrics_v1"  # versioned: an older fedray's exporter may still run on a cluster
EXPORTER_NAMESPACE = "fedray"


class JobMetrics:
    """The metrics of one job; tags: fl_job (Prometheus reserves `job`), codec, direction, outcome."""

    def __init__(self, job: str, codec: str, interval_s: float = 1.0) -> None:
        self._job, self._codec = job, codec
        self._exporter = _exporter()
        # Rounds go to the exporter at most once per `interval_s` (the first at once): a Ray call
        # per round cost the driver and the exporter ~2 ms of CPU per round on a job whose rounds
        # take ~20 ms; Prometheus scrapes every few seconds anyway. `flush` sends the rest.
        self._interval, self._pending, self._sent = interval_s, [], -math.inf

    def record_round(
        self, *, round: int, ok: int, failed: int, bytes_up: int, bytes_down: int, fp32_up: int,
        accuracy: float, wall_s: float, decode_s: float, broadcast_codec: str, metrics=None,
    ) -> None:
        self._pending.append(dict(
            round=round, ok=ok, failed=failed, bytes_up=bytes_up, bytes_down=bytes_down, fp32_up=fp32_up,
            accuracy=accuracy, wall_s=wall_s, decode_s=decode_s, broadcast_codec=broadcast_codec,
            metrics=dict(metrics or {}),
        ))
        if time.monotonic() - self._sent >= self._interval:
            self.flush()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait (at most `timeout_s`) until the exporter serves: started with the job, its process
        start-up otherwise takes the CPU from the job's first rounds. A lost exporter is no error."""
        try:
            ray_get(self._exporter.__ray_ready__.remote(), timeout=timeout_s)
        except Exception:
            pass

    def flush(self) -> None:
        """Send the rounds not sent yet (the job calls it when it ends)."""
        if not self._pending:
            return
        rows, self._pending, self._sent = self._pending, [], time.monotonic()
        # Fire and forget: the calls of one caller run in order, and a lost exporter must not
        # stop a training job.
        try:
            self._exporter.record_rounds.remote(job=self._job, codec=self._codec, rows=rows)
        except AttributeError:  # a cluster's exporter from a fedray before record_rounds
            for row in rows:
                self._exporter.record_round.remote(job=self._job, codec=self._codec, **row)


def ray_get(ref, timeout: float):
    import ray

    return ray.get(ref, timeout=timeout)


def _exporter():
    """The cluster's metrics actor, started on first use."""
    import ray

    return ray.remote(_Exporter).options(
        name=EXPORTER_NAME, namespace=EXPORTER_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1,
    ).remote()


class _Exporter:
    """Holds the Ray metric objects; lives as long as the cluster.

    Ray 2.60's metrics agent forgets a gauge value that its process has not set again within two
    report intervals (20 s by default), even while the process lives; a thread here sets every
    gauge's last value again each second.
    """

    def __init__(self) -> None:
        from ray.util import metrics as m

        self._lock = threading.Lock()
        self._last: dict[tuple, tuple] = {}  # (gauge name, sorted tags) -> (gauge, value, tags)
        threading.Thread(target=self._refresh, name="fedray-gauge-refresh", daemon=True).start()

        self.rounds = _counter(m, "fedray_rounds_total", "Completed rounds", ("fl_job",))
        self.round_gauge = _gauge(m, "fedray_round", "Current round", ("fl_job",))
        self.clients = _counter(m, "fedray_clients_total", "Client updates by outcome", ("fl_job", "outcome"))
        self.bytes = _counter(m, "fedray_bytes_total", "Bytes on the wire", ("fl_job", "codec", "direction"))
        self.ratio = _gauge(m, "fedray_compression_ratio", "fp32 bytes / wire bytes, uploads", ("fl_job", "codec"))
        self.accuracy = _gauge(m, "fedray_accuracy", "Global model test accuracy", ("fl_job",))
        self.round_s = _gauge(m, "fedray_round_seconds", "Wall time of the last round", ("fl_job",))
        self.decode_s = _gauge(m, "fedray_decode_seconds", "Server decode time in the last round (all shards)",
                               ("fl_job", "codec"))
        # One gauge for whatever the task's evaluate returns; `metric` takes the few names it returns.
        self.eval_metric = _gauge(m, "fedray_eval_metric", "Global model metric from the task's evaluate",
                                  ("fl_job", "metric"))

    def record_round(
        self, *, job: str, codec: str, round: int, ok: int, failed: int, bytes_up: int, bytes_down: int,
        fp32_up: int, accuracy: float, wall_s: float, decode_s: float, broadcast_codec: str, metrics=None,
    ) -> None:
        t = {"fl_job": job}
        with self._lock:
            self.rounds.inc(1, t)
            self._set(self.round_gauge, round, t)
            if ok:  # Ray's Counter.inc refuses 0
                self.clients.inc(ok, {**t, "outcome": "ok"})
            if failed:
                self.clients.inc(failed, {**t, "outcome": "failed"})
            if bytes_up:
                self.bytes.inc(bytes_up, {**t, "codec": codec, "direction": "up"})
                self._set(self.ratio, fp32_up / bytes_up, {**t, "codec": codec})
            if bytes_down:
                self.bytes.inc(bytes_down, {**t, "codec": broadcast_codec, "direction": "down"})
            if accuracy == accuracy:  # not NaN: the task reports an accuracy
                self._set(self.accuracy, accuracy, t)
            for name, v in (metrics or {}).items():
                if v == v:
                    self._set(self.eval_metric, float(v), {**t, "metric": str(name)})
            self._set(self.round_s, wall_s, t)
            self._set(self.decode_s, decode_s, {**t, "codec": codec})

    def record_rounds(self, *, job: str, codec: str, rows: list[dict]) -> None:
        """`record_round` for each of `rows` in order (counters add up, gauges keep the last)."""
        for row in rows:
            self.record_round(job=job, codec=codec, **row)

    def _set(self, gauge, value: float, tags: dict) -> None:
        gauge.set(value, tags)
        self._last[(gauge.info["name"], tuple(sorted(tags.items())))] = (gauge, value, tags)

    def _refresh(self) -> None:
        while True:  # a daemon thread: ends with the actor's process
            time.sleep(1.0)
            with self._lock:
                for gauge, value, tags in list(self._last.values()):
                    gauge.set(value, tags)


# Ray refuses to declare the same metric twice in one process with other settings; cache them.
@lru_cache(maxsize=None)
def _counter(m, name, desc, tags):
    return m.Counter(name, description=desc, tag_keys=tags)


@lru_cache(maxsize=None)
def _gauge(m, name, desc, tags):
    return m.Gauge(name, description=desc, tag_keys=tags)
