"""A real client: runs outside Ray, talks to the aggregation service over gRPC only.

It asks the service for the job (model, training and codec settings, open round), downloads the
round's model, trains on its own local data and uploads its update: the same wire path as the
simulated clients, from another process or machine. `fedray client` runs it from the shell.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import grpc
import numpy as np

from fedray.compression import CodecContext, get_codec
from fedray.proto import serde

from .client import client_seed, decode_model, upload_with_retry
from .models import build_model, get_params, set_params
from .train import TrainConfig, train_local

__all__ = ["LocalData", "LocalDataError", "RemoteClient", "ServiceUnreachableError"]


@dataclass(frozen=True)
class LocalData:
    """The client's own examples (features as stored, e.g. uint8 pixels) and how to scale them."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    scale: float = 1.0
    shift: float = 0.0


class ServiceUnreachableError(ConnectionError):
    """No aggregation service answered at `address` within `waited_s` seconds."""

    def __init__(self, address: str, job_id: str, waited_s: float) -> None:
        super().__init__(
            f"no aggregation service answered at {address} within {waited_s:g} s (job {job_id}): "
            "check --server and that the job is running, or raise --connect-timeout-s"
        )
        self.address, self.job_id, self.waited_s = address, job_id, waited_s


class LocalDataError(ValueError):
    """The client's local data does not fit the job's model (feature shape or number of classes)."""


def _check_fits(model, start: dict, data: LocalData) -> None:
    """The model built for the local data must have the job's parameter shapes."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in start.items():
        if own.get(k) != tuple(v.shape):
            raise LocalDataError(
                f"local data of shape {tuple(data.x.shape[1:])} per example with {data.num_classes} classes does not "
                f"fit the job's model ({k} is {tuple(v.shape)} in the job, {own.get(k)} here): give examples "
                "shaped like the job's data set and its number of classes"
            )


class RemoteClient:
    """Takes part in every open round of one job until the job finishes.

    Raises (from `run`):
        grpc.RpcError: the service refused the client (bad token: UNAUTHENTICATED, another job:
            PERMISSION_DENIED) or stayed unreachable.
    """

    def __init__(
        self, *, server: str, job_id: str, client_id: int, token: str, data: LocalData,
        ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
        poll_s: float = 0.1,
    ) -> None:
        self.job_id, self.client_id, self.token, self.data, self.poll_s = job_id, client_id, token, data, poll_s
        self._tls = dict(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self.server = server
        self.channel = serde.open_channel(server, **self._tls)
        self.rounds_done: list[int] = []
        self.last_round = 0  # the latest round the service reported (open or closed)

    def _follow_shard(self, info: serde.JobInfo) -> None:
        """Move to this client's own shard (the one that accepts its uploads)."""
        if not info.shard_addresses:
            return
        mine = info.shard_addresses[serde.shard_index(self.client_id, len(info.shard_addresses))]
        if mine != self.server:
            self.channel.close()
            self.server, self.channel = mine, serde.open_channel(mine, **self._tls)

    def wait_until_reachable(self, timeout_s: float) -> None:
        """Block until the service's channel connects (gRPC's own reconnect back-off, no polling).

        Raises:
            ServiceUnreachableError: nothing answered at the address within `timeout_s`.
        """
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ServiceUnreachableError(self.server, self.job_id, timeout_s) from None

    def missed_rounds(self) -> list[int]:
        """Rounds of the job up to the latest one seen that this client did not train in."""
        done = set(self.rounds_done)
        return [r for r in range(1, self.last_round + 1) if r not in done]

    def _job(self) -> serde.JobInfo:
        return serde.call_get_job(self.channel, job_id=self.job_id, client_id=self.client_id, token=self.token)

    def run(self, *, max_rounds: int | None = None, timeout_s: float = 600.0, gone_after_s: float = 5.0) -> list[int]:
        """Train in each open round until the job finishes, `max_rounds` are done or time runs out.

        Before the service first answers, an unreachable service is waited for (up to
        `timeout_s`); after that, one unreachable for `gone_after_s` is taken as the job's end.
        """
        deadline = time.monotonic() + timeout_s
        seen, unreachable_since = False, None
        while time.monotonic() < deadline:
            try:
                info = self._job()
                seen, unreachable_since = True, None
                self.last_round = max(self.last_round, info.round)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                unreachable_since = unreachable_since or time.monotonic()
                if seen and time.monotonic() - unreachable_since > gone_after_s:
                    break
                time.sleep(self.poll_s)
                continue
            if info.finished or (max_rounds is not None and len(self.rounds_done) >= max_rounds):
                break
            if info.round_open and info.round not in self.rounds_done:
                self._follow_shard(info)
                try:
                    self.train_round(info)
                except grpc.RpcError as e:
                    # The round closed under us (stale): wait for the next one.
                    if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                self.rounds_done.append(info.round)
            else:
                time.sleep(self.poll_s)
        return self.rounds_done

    def train_round(self, info: serde.JobInfo) -> dict:
        spec = json.loads(info.spec_json)
        m, tr, comp = spec["model"], spec["training"], spec["compression"]
        stages = serde.call_download(self.channel, job_id=self.job_id, round=info.round, client_id=self.client_id,
                                     token=self.token)
        start = decode_model(stages[-1].tensors, comp["broadcast"], comp["broadcast_params"])
        model = build_model(m["kind"], self.data.x.shape[1:], self.data.num_classes, m["hidden"])
        _check_fits(model, start, self.data)
        set_params(model, start)
        seed = client_seed(spec.get("seed", 0), info.round, self.client_id)
        cfg = TrainConfig(**{k: tr[k] for k in TrainConfig.model_fields})
        stats = train_local(model, self.data.x, self.data.y, self.data.scale, self.data.shift, cfg, seed)
        codec = get_codec(comp["codec"], **comp["codec_params"])
        params = get_params(model)
        tensors = [(k, codec.encode(params[k] - start[k], CodecContext(seed=seed, key=k))) for k in start]
        msgs = serde.encode_upload(job_id=self.job_id, round=info.round, client_id=self.client_id,
                                   weight=float(stats.examples), tensors=tensors, metrics={"loss": stats.loss})
        return upload_with_retry(self.channel, msgs, self.token)

    def close(self) -> None:
        self.channel.close()
