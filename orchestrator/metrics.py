"""fedray's Ray metrics, declared once with fixed low-cardinality tags (never per client).

They appear on Ray's metrics export port with a `ray_` prefix (e.g. `ray_fedray_rounds_total`).
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["JobMetrics"]


class JobMetrics:
    """The metrics of one job; tags: fl_job (Prometheus reserves `job`), codec, direction, outcome."""

    def __init__(self, job: str, codec: str) -> None:
        from ray.util import metrics as m

        self._tags = {"fl_job": job}
        self._codec = codec
        self.rounds = _counter(m, "fedray_rounds_total", "Completed rounds", ("fl_job",))
        self.round_gauge = _gauge(m, "fedray_round", "Current round", ("fl_job",))
        self.clients = _counter(m, "fedray_clients_total", "Client updates by outcome", ("fl_job", "outcome"))
        self.bytes = _counter(m, "fedray_bytes_total", "Bytes on the wire", ("fl_job", "codec", "direction"))
        self.ratio = _gauge(m, "fedray_compression_ratio", "fp32 bytes / wire bytes, uploads", ("fl_job", "codec"))
        self.accuracy = _gauge(m, "fedray_accuracy", "Global model test accuracy", ("fl_job",))
        self.round_s = _gauge(m, "fedray_round_seconds", "Wall time of the last round", ("fl_job",))
        self.decode_s = _gauge(m, "fedray_decode_seconds", "Server decode time in the last round", ("fl_job", "codec"))
        # One gauge for whatever the task's evaluate returns; `metric` takes the few names it returns.
        self.eval_metric = _gauge(m, "fedray_eval_metric", "Global model metric from the task's evaluate",
                                  ("fl_job", "metric"))

    def record_round(
        self, *, round: int, ok: int, failed: int, bytes_up: int, bytes_down: int, fp32_up: int,
        accuracy: float, wall_s: float, decode_s: float, broadcast_codec: str, metrics=None,
    ) -> None:
        t, c = self._tags, self._codec
        self.rounds.inc(1, t)
        self.round_gauge.set(round, t)
        if ok:
            self.clients.inc(ok, {**t, "outcome": "ok"})
        if failed:
            self.clients.inc(failed, {**t, "outcome": "failed"})
        if bytes_up:
            self.bytes.inc(bytes_up, {**t, "codec": c, "direction": "up"})
        if bytes_down:
            self.bytes.inc(bytes_down, {**t, "codec": broadcast_codec, "direction": "down"})
        if bytes_up:
            self.ratio.set(fp32_up / bytes_up, {**t, "codec": c})
        if accuracy == accuracy:  # not NaN: the task reports an accuracy
            self.accuracy.set(accuracy, t)
        for name, v in (metrics or {}).items():
            if v == v:
                self.eval_metric.set(float(v), {**t, "metric": str(name)})
        self.round_s.set(wall_s, t)
        self.decode_s.set(decode_s, {**t, "codec": c})


# Ray refuses to declare the same metric twice in one process with other settings; cache them.
@lru_cache(maxsize=None)
def _counter(m, name, desc, tags):
    return m.Counter(name, description=desc, tag_keys=tags)


@lru_cache(maxsize=None)
def _gauge(m, name, desc, tags):
    return m.Gauge(name, description=desc, tag_keys=tags)
