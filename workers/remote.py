"""A real client: runs outside Ray, talks to the aggregation service over gRPC only.

`ServiceLink` is the connection (job info, the client's shard, the job spec as a typed
`JobSpec`, downloads, uploads). `RealClient` takes part in every open round of a job with a
`fedray.Task`, running the same `ClientStep` as the worker actors: P2U stages, Federated
Dropout subnets, OMC, pruning masks and stateful codecs (kept across rounds) behave as for
simulated clients. `fedray client` runs it from the shell.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from fedray.proto import serde
from fedray.task import Task

from .broadcast import Broadcast, broadcast_of_stages, decode_broadcast, stages_to_use
from .client import TrainerSetup, upload_with_retry
from .data import ArrayDataset
from .step import ClientStep, StepOutput

__all__ = ["LocalData", "LocalDataError", "RealClient", "RemoteClient", "ServiceLink", "ServiceUnreachableError"]


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


class ServiceLink:
    """One real client's connection to a job's aggregation service."""

    def __init__(self, *, server: str, job_id: str, client_id: int, token: str, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, poll_s: float = 0.1) -> None:
        self.job_id, self.client_id, self.token, self.poll_s = job_id, int(client_id), token, poll_s
        self._tls = dict(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self.server = server
        self.channel = serde.open_channel(server, **self._tls)
        self._spec: tuple[str, Any] | None = None
        self.last_round = 0  # the latest round the service reported (open or closed)

    def job(self) -> serde.JobInfo:
        return serde.call_get_job(self.channel, job_id=self.job_id, client_id=self.client_id, token=self.token)

    def follow_shard(self, info: serde.JobInfo) -> None:
        """Move to this client's own shard (the one that accepts its uploads)."""
        if not info.shard_addresses:
            return
        mine = info.shard_addresses[serde.shard_index(self.client_id, len(info.shard_addresses))]
        if mine != self.server:
            self.channel.close()
            self.server, self.channel = mine, serde.open_channel(mine, **self._tls)

    def spec(self, info: serde.JobInfo):
        """The job's spec, typed (`JobSpec`), as the service publishes it."""
        from fedray.orchestrator.spec import JobSpec

        if self._spec is None or self._spec[0] != info.spec_json:
            self._spec = (info.spec_json, JobSpec.from_dict(json.loads(info.spec_json)))
        return self._spec[1]

    def next_round(self, done: list[int], *, deadline: float, gone_after_s: float) -> serde.JobInfo | None:
        """Wait for an open round not in `done`; None when the job finished, the service went
        away for `gone_after_s` after answering once, or `deadline` (monotonic) passed.

        Raises:
            grpc.RpcError: the service refused the client (bad token: UNAUTHENTICATED, another job:
                PERMISSION_DENIED).
        """
        seen, unreachable_since = False, None
        while time.monotonic() < deadline:
            try:
                info = self.job()
                seen, unreachable_since = True, None
                self.last_round = max(self.last_round, info.round)
            except grpc.RpcError as e:
                # CANCELLED: the server stopped while answering (the job's end, like UNAVAILABLE)
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                unreachable_since = unreachable_since or time.monotonic()
                if seen and time.monotonic() - unreachable_since > gone_after_s:
                    return None
                time.sleep(self.poll_s)
                continue
            if info.finished:
                return None
            if info.round_open and info.round not in done:
                self.follow_shard(info)
                return info
            time.sleep(self.poll_s)
        return None

    def download(self, spec, round: int) -> Broadcast:
        """The round's model as the workers get it; P2U: the stages the job decodes, in order."""
        comp = spec.compression
        n = stages_to_use(codec=comp.broadcast, codec_params=comp.broadcast_params, round=round)
        stages = serde.call_download(self.channel, job_id=self.job_id, round=round, client_id=self.client_id,
                                     token=self.token, max_stage=n - 1)
        return broadcast_of_stages([s.tensors for s in stages], codec=comp.broadcast,
                                   codec_params=comp.broadcast_params, omc=spec.omc is not None, round=round)

    def upload(self, out: StepOutput) -> dict:
        msgs = serde.encode_upload(
            job_id=self.job_id, round=out.round, client_id=self.client_id, weight=float(out.examples),
            tensors=out.tensors, metrics={"loss": out.loss, "train_s": out.train_s},
            subnet_seed=out.subnet_seed, keep_rate=out.keep_rate, weights=out.weights,
        )
        return upload_with_retry(self.channel, msgs, self.token)

    def setup(self, spec) -> TrainerSetup:
        return TrainerSetup.from_spec(spec, job_id=self.job_id, device="cpu")

    def wait_until_reachable(self, timeout_s: float) -> None:
        """Block until the service's channel connects (gRPC's own reconnect back-off, no polling).

        Raises:
            ServiceUnreachableError: nothing answered at the address within `timeout_s`.
        """
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ServiceUnreachableError(self.server, self.job_id, timeout_s) from None

    def close(self) -> None:
        self.channel.close()


class _LocalDataTask(Task):
    """The job's task with this client's own examples (`fedray client --dataset/--data-npz`)."""

    def __init__(self, base: Task, data: LocalData) -> None:
        self.base, self.local = base, data

    def model(self):
        return self.base.model()

    def num_clients(self) -> int:
        return self.base.num_clients()

    def client_data(self, client_id: int):
        d = self.local
        return ArrayDataset(d.x, d.y, d.scale, d.shift)

    def fd_layout(self):
        return self.base.fd_layout()

    def fd_model(self, hidden):
        return self.base.fd_model(hidden)


class RealClient:
    """Takes part in every open round of one job until the job finishes, with `task` (default:
    the job spec's own task; an import string is built with `task_params`, else with the job's
    params when the job runs the same target) or, for `fedray client --dataset`, `data` as its
    local examples.

    Raises (from `run`):
        grpc.RpcError: the service refused the client (bad token: UNAUTHENTICATED, another job:
            PERMISSION_DENIED).
        ClientError: the client step failed (stage, client id and round named).
    """

    def __init__(self, *, server: str, job_id: str, client_id: int, token: str, task: Task | str | None = None,
                 task_params: dict | None = None, data: LocalData | None = None, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, poll_s: float = 0.1) -> None:
        self.link = ServiceLink(server=server, job_id=job_id, client_id=client_id, token=token, ca_file=ca_file,
                                cert_file=cert_file, key_file=key_file, poll_s=poll_s)
        self.client_id, self.task, self.task_params, self.data = int(client_id), task, task_params, data
        self.rounds_done: list[int] = []
        self._step: ClientStep | None = None  # kept across rounds: codec state (error feedback)

    def run(self, *, max_rounds: int | None = None, timeout_s: float = 600.0, gone_after_s: float = 5.0) -> list[int]:
        """Train in each open round until the job finishes, `max_rounds` are done or time runs out.

        Before the service first answers, an unreachable service is waited for (up to
        `timeout_s`); after that, one unreachable for `gone_after_s` is taken as the job's end.
        """
        deadline = time.monotonic() + timeout_s
        attempted: list[int] = []  # trained or closed under us: not tried again
        while max_rounds is None or len(attempted) < max_rounds:
            info = self.link.next_round(attempted, deadline=deadline, gone_after_s=gone_after_s)
            if info is None:
                break
            attempted.append(info.round)
            try:
                self.train_round(info)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # the round closed under us: missed
                    raise
                continue
            self.rounds_done.append(info.round)
        return self.rounds_done

    def _client_step(self, spec) -> ClientStep:
        if self._step is None:
            from fedray.plugins import load_task, task_for_spec

            task = self.task
            if isinstance(task, str):  # params: given, else the job's own for the same target
                same = spec.task is not None and spec.task.target == task
                task = load_task(task, self.task_params if self.task_params is not None
                                 else (dict(spec.task.params) if same else {}))
            elif task is None:
                task = task_for_spec(spec)
            if self.data is not None:
                _check_fits(task.model(), self.data)
                task = _LocalDataTask(task, self.data)
            torch.manual_seed(spec.seed)  # the model's initial weights are overwritten every round
            self._step = ClientStep(self.link.setup(spec), task, torch.device("cpu"))
        return self._step

    @property
    def server(self) -> str:
        return self.link.server

    @property
    def job_id(self) -> str:
        return self.link.job_id

    def wait_until_reachable(self, timeout_s: float) -> None:
        """See `ServiceLink.wait_until_reachable`."""
        self.link.wait_until_reachable(timeout_s)

    def missed_rounds(self) -> list[int]:
        """Rounds of the job up to the latest one seen that this client did not train in."""
        done = set(self.rounds_done)
        return [r for r in range(1, self.link.last_round + 1) if r not in done]

    def train_round(self, info: serde.JobInfo) -> dict:
        spec = self.link.spec(info)
        step = self._client_step(spec)
        bcast = self.link.download(spec, info.round)
        out = step.run(info.round, decode_broadcast(bcast), self.client_id, bcast)
        return self.link.upload(out)

    def close(self) -> None:
        self.link.close()


def _check_fits(model, data: LocalData) -> None:
    """The job's model must take the local examples and have an output for every local class."""
    x = torch.as_tensor(np.asarray(data.x[:1], dtype=np.float32) * data.scale + data.shift)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError:
        out = None
    if out is None or out.shape[-1] < data.num_classes:
        raise LocalDataError(
            f"local data of shape {tuple(data.x.shape[1:])} per example with {data.num_classes} classes does not "
            f"fit the job's model: give examples shaped like the job's data set and its number of classes"
        )


RemoteClient = RealClient  # the name earlier releases used
