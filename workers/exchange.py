"""The receive/send client API, for users who keep their own training loop (NVFlare's Client
API shape):

    import fedray
    fl = fedray.connect(server="10.0.0.5:50051", job_id="job-1", client_id=7, token=token)
    model = MyNet()
    while fl.is_running():
        model.load_state_dict(fl.receive(), strict=False)   # the round's global model
        loss = my_training_loop(model, my_data)            # unchanged user code
        fl.send(model.state_dict(), num_examples=len(my_data), metrics={"loss": loss})
    fl.close()

`send` goes through the same `ClientStep` as every other client: the update is encoded with the
job's codec (error-feedback memory kept across rounds), uploaded to the client's shard with
retries. Jobs with Federated Dropout or OMC need fedray to build the model; they are refused
here with a message naming them.
"""

from __future__ import annotations

import time
from typing import Mapping

import grpc
import torch

from .broadcast import decode_broadcast
from .remote import ServiceLink
from .step import ClientStep

__all__ = ["Exchange", "connect"]


class Exchange:
    """One real client's receive/send session with a running job."""

    def __init__(self, link: ServiceLink, *, timeout_s: float = 600.0, gone_after_s: float = 5.0) -> None:
        self.link = link
        self._deadline = time.monotonic() + timeout_s
        self._gone_after_s = gone_after_s
        self._info = None
        self._start: dict[str, torch.Tensor] | None = None
        self._step: ClientStep | None = None
        self._t0 = 0.0
        self.rounds_done: list[int] = []
        self.missed_rounds: list[int] = []  # closed before this client's upload arrived

    @property
    def round(self) -> int | None:
        """The round being worked on (after `is_running` returned True)."""
        return self._info.round if self._info is not None else None

    @property
    def spec(self):
        """The job's typed `JobSpec` (training settings: epochs, batch size, lr)."""
        return self.link.spec(self._info) if self._info is not None else None

    def is_running(self) -> bool:
        """Wait for the next round this client has not done; False once the job is over.

        Raises:
            grpc.RpcError: the service refused the client.
            ValueError: the job uses Federated Dropout or OMC (they need fedray's own model).
        """
        attempted = self.rounds_done + self.missed_rounds
        if self._info is not None and self._info.round not in attempted:
            return True
        self._info = self.link.next_round(attempted, deadline=self._deadline, gone_after_s=self._gone_after_s)
        self._start = None
        if self._info is None:
            return False
        spec = self.link.spec(self._info)
        if spec.dropout is not None or spec.omc is not None:
            raise ValueError(f"job {self.link.job_id}: the receive/send API trains the caller's own model, which "
                             f"cannot take part in a job with {'dropout' if spec.dropout else 'omc'}; "
                             f"use fedray client --task instead")
        if self._step is None:
            self._step = ClientStep(self.link.setup(spec), None, torch.device("cpu"))
        return True

    def receive(self) -> dict[str, torch.Tensor]:
        """The current round's global model: a state-dict-like mapping of float tensors (load
        it with `model.load_state_dict(..., strict=False)`; integer buffers are not federated)."""
        if self._info is None and not self.is_running():
            raise RuntimeError("the job is over: nothing to receive")
        if self._start is None:
            bcast = self.link.download(self.link.spec(self._info), self._info.round)
            self._start = decode_broadcast(bcast)
            self._t0 = time.perf_counter()
        return {k: v.clone() for k, v in self._start.items()}

    def send(self, weights: Mapping[str, torch.Tensor], *, num_examples: int,
             metrics: Mapping[str, float] | None = None) -> dict:
        """Send the trained weights of this round (the update `weights - received` is what
        travels, encoded with the job's codec). Returns the service's acknowledgement, or
        `{"round": r, "missed": True}` when the round closed before the upload arrived (the round
        is then in `missed_rounds`, and `is_running` moves on to the next one).

        Raises:
            RuntimeError: nothing was received this round.
            ClientError: the weights lack a tensor of the model, or encoding failed.
            grpc.RpcError: the service refused the upload.
        """
        if self._start is None or self._step is None:
            raise RuntimeError("send() before receive(): receive this round's model first")
        out = self._step.finish(self._info.round, self.link.client_id, self._start, weights,
                                examples=num_examples, metrics=metrics, train_s=time.perf_counter() - self._t0)
        self._start = None
        try:
            ack = self.link.upload(out)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # FAILED_PRECONDITION: the round closed
                raise
            self.missed_rounds.append(self._info.round)
            return {"round": self._info.round, "missed": True}
        self.rounds_done.append(self._info.round)
        return ack

    def close(self) -> None:
        self.link.close()


def connect(*, server: str, job_id: str, client_id: int, token: str, ca_file: str | None = None,
            cert_file: str | None = None, key_file: str | None = None, timeout_s: float = 600.0) -> Exchange:
    """Join a running job as a real client that trains with its own loop (see the module doc).

    `token` comes from `fedray token --job-id J --client-id N` (the job's secret signs it).
    """
    link = ServiceLink(server=server, job_id=job_id, client_id=client_id, token=token, ca_file=ca_file,
                       cert_file=cert_file, key_file=key_file)
    return Exchange(link, timeout_s=timeout_s)
