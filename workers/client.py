"""What one worker does for a batch of virtual clients: decode the broadcast model once, then per
client train locally, encode the update with the job's codec and stream it to the aggregation
service over gRPC. Plain Python: `pool.py` runs it inside Ray actors, tests run it in-process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import grpc
import numpy as np
import torch

from fedray.compression import CodecContext, CodecState, CodecStateStore, get_codec
from fedray.compression.fd import SubnetSpec, extract, flops_per_example, keep_rate_for, submodel_hidden
from fedray.compression.omc import OMCModel
from fedray.compression.payload import Payload
from fedray.proto import serde
from fedray.proto.auth import client_token

from .batched import supports_batched, train_batched_stacked
from .broadcast import Broadcast, decode_broadcast, decode_tensors
from .data import Dataset, Partition
from .models import build_model, model_layout, set_params
from .train import TrainConfig, evaluate, pick_device, train_local

__all__ = [
    "ClientError", "ClientResult", "ClientTrainer", "TrainerSetup", "client_seed", "decode_model", "upload_with_retry",
]

_RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


def client_seed(job_seed: int, round: int, client_id: int) -> int:
    """The seed of one client's work in one round: independent of which worker runs it."""
    return int(np.random.SeedSequence([job_seed, round, client_id]).generate_state(1, np.uint64)[0])


class ClientError(RuntimeError):
    """A client failed; carries the stage ('train', 'encode', 'upload'), client id and round."""

    def __init__(self, stage: str, client_id: int, round: int, cause: BaseException) -> None:
        super().__init__(f"client {client_id}, round {round}, stage {stage}: {type(cause).__name__}: {cause}")
        self.stage, self.client_id, self.round = stage, client_id, round


@dataclass(frozen=True)
class TrainerSetup:
    """Everything a worker needs for the whole job (sent once, at start)."""

    job_id: str
    secret: str
    seed: int
    model_kind: str
    hidden: tuple[int, ...]
    train: TrainConfig
    codec: str
    codec_params: Mapping[str, Any] = field(default_factory=dict)
    broadcast: str = "identity"
    broadcast_params: Mapping[str, Any] = field(default_factory=dict)
    torch_threads: int = 1
    tls_ca_file: str | None = None  # set when the service serves TLS
    tls_server_name: str | None = None  # the certificate's name, when it does not hold the shard's node IP
    dropout: Any = None  # orchestrator DropoutSpec-like: keep_rates, mode, probs, policy
    omc: Any = None  # OMCConfig
    prox_mu: float = 0.0  # FedProx
    batched: bool = True  # train a call's clients together when the model allows (workers/batched.py)
    pruning: bool = False  # keep the global model's zero weights (pruned) at zero while training
    device: str = "auto"  # auto: CUDA when Ray gave this actor a GPU; cpu; cuda
    client_eval: bool = False  # each client evaluates the received model on its own data first


@dataclass(frozen=True)
class ClientResult:
    client_id: int
    round: int
    examples: int = 0
    loss: float = float("nan")
    train_s: float = 0.0
    bytes_up: int = 0  # protobuf bytes streamed to the service
    error: str | None = None
    keep_rate: float = 1.0
    flops: int = 0  # analytic training FLOPs of this client's round
    param_memory_bytes: int = 0  # parameter memory held while training (OMC: stored + transient peak)
    eval_accuracy: float | None = None  # client-side evaluation of the received model on local data
    eval_loss: float | None = None


def decode_model(stage_tensors: Sequence[tuple[str, Payload]], codec_name: str, codec_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return decode_tensors(stage_tensors, codec_name, codec_params)


_STATEFUL = ("ef", "powersgd", "pipeline")


class ClientTrainer:
    """Trains many virtual clients per call; one instance per worker actor."""

    def __init__(self, setup: TrainerSetup, data: Dataset, parts: Partition) -> None:
        torch.set_num_threads(setup.torch_threads)
        self.setup = setup
        self.data = data
        self.parts = parts
        # OMC keeps its packed parameters in numpy on the host: it trains on the CPU.
        self.device = pick_device("cpu" if setup.omc is not None else setup.device)
        self.model = build_model(setup.model_kind, data.input_shape, data.num_classes, setup.hidden).to(self.device)
        self.layout = model_layout(setup.model_kind, data.input_shape, data.num_classes, setup.hidden)
        self.codec = get_codec(setup.codec, **dict(setup.codec_params))
        self._channels: dict[str, grpc.Channel] = {}
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None
        self._submodels: dict[tuple[int, ...], torch.nn.Module] = {}
        self._states = CodecStateStore()  # error feedback / warm starts of the clients that trained, bounded
        self._keep = setup.dropout  # a DropoutSpec is a KeepRateConfig (or None)

    def _chan(self, address: str) -> grpc.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = serde.open_channel(
                address, ca_file=self.setup.tls_ca_file, server_name=self.setup.tls_server_name)
        return ch

    def _global(self, round: int, broadcast: Broadcast) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != round:
            self._cached = (round, {k: v.to(self.device) for k, v in decode_broadcast(broadcast).items()})
        return self._cached[1]

    def _model_for(self, hidden: tuple[int, ...]) -> torch.nn.Module:
        m = self._submodels.get(hidden)
        if m is None:
            s, d = self.setup, self.data
            m = self._submodels[hidden] = build_model(s.model_kind, d.input_shape, d.num_classes, hidden).to(self.device)
        return m

    def train_clients(
        self, round: int, broadcast: Broadcast, client_ids: Sequence[int],
        servers: Sequence[str], attempt: int = 0,
    ) -> list[ClientResult]:
        """Train, encode and upload each client to its shard (`servers[shard_index(id)]`).

        A failing client is reported in its result, not raised.
        """
        start = self._global(round, broadcast)
        if self._batchable() and client_ids:
            # Batched even for one client: a client's update is then bit-identical whatever batch
            # it is trained in (a retry after a fault trains it in another one; tested).
            return self._batched(round, start, [int(c) for c in client_ids], servers, attempt)
        out = []
        for cid in client_ids:
            try:
                out.append(self._one(round, start, int(cid), servers, attempt, broadcast))
            except ClientError as e:
                out.append(ClientResult(int(cid), round, error=str(e)))
        return out

    def _batchable(self) -> bool:
        s = self.setup
        return (s.batched and self._keep is None and s.omc is None and not s.prox_mu and not s.pruning
                and self.device.type == "cpu" and supports_batched(self.model))

    def _batched(self, round: int, start, cids: list[int], servers, attempt: int) -> list[ClientResult]:
        """Train every client of the call as one batched computation, then encode and upload each."""
        s, d = self.setup, self.data
        seeds = [client_seed(s.seed, round, c) for c in cids]
        idx = [self.parts.client(c) for c in cids]
        evals = {}
        if s.client_eval:
            set_params(self.model, start)
            evals = {c: evaluate(self.model, d.x_train[i], d.y_train[i], d.scale, d.shift) for c, i in zip(cids, idx)}
        t0 = time.perf_counter()
        try:
            stacked, trained = train_batched_stacked(self.model, start, [d.x_train[i] for i in idx],
                                                     [d.y_train[i] for i in idx], s.train, seeds, d.scale, d.shift)
        except Exception as e:  # the whole batch failed in training: report each client
            return [ClientResult(c, round, error=str(ClientError("train", c, round, e))) for c in cids]
        train_s = (time.perf_counter() - t0) / len(cids)
        flops = flops_per_example(self.layout, None)
        mem = 4 * sum(int(v.numel()) for v in start.values())
        encoded, out = [], {}
        if s.codec not in _STATEFUL:  # stateless codec: encode each tensor for all clients at once
            try:
                per = self.codec.encode_batch({k: stacked[k] - start[k] for k in start})
            except Exception as e:
                return [ClientResult(c, round, error=str(ClientError("encode", c, round, e))) for c in cids]
            for i, (cid, stats) in enumerate(zip(cids, trained)):
                msgs = serde.encode_upload(
                    job_id=s.job_id, round=round, client_id=cid, weight=float(stats.examples),
                    tensors=[(k, per[k][i]) for k in start], attempt=attempt,
                    metrics={"loss": stats.loss, "train_s": train_s},
                )
                encoded.append((cid, stats, msgs))
        else:
            for i, (cid, seed, stats) in enumerate(zip(cids, seeds, trained)):
                params = {k: v[i] for k, v in stacked.items()}
                try:
                    encoded.append((cid, stats, self._encode(round, cid, seed, params, start, stats, train_s, attempt)))
                except ClientError as e:
                    out[cid] = ClientResult(cid, round, error=str(e))
        stats_of = {c: x for c, x, _ in encoded}
        for cid, nbytes, err in self._upload_many(round, [(c, m) for c, _, m in encoded], servers, attempt):
            st = stats_of[cid]
            out[cid] = (ClientResult(cid, round, error=err) if err else
                        ClientResult(cid, round, st.examples, st.loss, train_s, nbytes,
                                     flops=flops * st.examples * s.train.local_epochs, param_memory_bytes=mem,
                                     eval_accuracy=evals.get(cid, (None, None))[0],
                                     eval_loss=evals.get(cid, (None, None))[1]))
        return [out[c] for c in cids]

    def _encode(self, round, cid, seed, params, base, stats, train_s, attempt) -> list:
        s = self.setup
        try:
            state = self._states.setdefault(cid, CodecState()) if s.codec in _STATEFUL else None
            tensors = [(k, self.codec.encode(params[k] - base[k], CodecContext(seed=seed, state=state, key=k)))
                       for k in base]
            return serde.encode_upload(
                job_id=s.job_id, round=round, client_id=cid, weight=float(stats.examples), tensors=tensors,
                attempt=attempt, metrics={"loss": stats.loss, "train_s": train_s},
            )
        except Exception as e:
            raise ClientError("encode", cid, round, e) from e

    def _upload_many(self, round: int, updates: list[tuple[int, list]], servers, attempt: int):
        """Upload many clients' updates: one UploadBatch stream per shard (the per-call gRPC cost is
        paid once, not per client); refused updates with a retryable status go again one by one.

        Yields (client id, wire bytes, error or None)."""
        s = self.setup
        by_shard: dict[int, list[tuple[int, list]]] = {}
        for cid, msgs in updates:
            by_shard.setdefault(serde.shard_index(cid, len(servers)), []).append((cid, msgs))
        for shard, group in by_shard.items():
            ch = self._chan(servers[shard])
            tokens = [client_token(s.secret, s.job_id, cid) for cid, _ in group]
            try:
                results = serde.call_upload_batch(ch, [(m, t) for (_, m), t in zip(group, tokens)])
            except grpc.RpcError:
                results = [None] * len(group)  # the call failed as a whole: each goes on its own, with retries
            for (cid, msgs), token, r in zip(group, tokens, results):
                if r is not None and (r.accepted or (r.code == grpc.StatusCode.ALREADY_EXISTS and attempt > 0)):
                    yield cid, r.wire_bytes, None
                    continue
                if r is not None and r.code not in _RETRYABLE:
                    yield cid, 0, str(ClientError("upload", cid, round, RuntimeError(f"{r.code.name}: {r.message}")))
                    continue
                try:
                    # After a batch that failed as a whole, ALREADY_EXISTS means the failed call
                    # committed this update before it broke: it counts once, and that is success.
                    sent = r is None
                    yield cid, upload_with_retry(ch, msgs, token, attempt=attempt, sent_before=sent)["wire_bytes"], None
                except Exception as e:
                    yield cid, 0, str(ClientError("upload", cid, round, e))

    def _one(self, round: int, start: Mapping[str, torch.Tensor], cid: int, servers: Sequence[str], attempt: int,
             broadcast: Broadcast) -> ClientResult:
        s = self.setup
        seed = client_seed(s.seed, round, cid)
        stage = "train"
        try:
            t0 = time.perf_counter()
            sub, keep, model, base = None, 1.0, self.model, start
            if self._keep is not None:  # Federated Dropout: a real, smaller dense model
                keep = keep_rate_for(cid, round, self._keep, seed=s.seed)
                sub = SubnetSpec(seed=seed, keep_rate=keep, policy=s.dropout.policy, round=round, client=cid)
                base = extract(start, self.layout, sub)
                model = self._model_for(submodel_hidden(self.layout, sub))
            set_params(model, base)
            idx = self.parts.client(cid)
            x, y = self.data.x_train[idx], self.data.y_train[idx]
            ev = evaluate(model, x, y, self.data.scale, self.data.shift) if s.client_eval else (None, None)
            if s.omc is not None:
                om = OMCModel(model, s.omc, seed=seed)
                try:
                    om.load_payloads(dict(broadcast.stages[0]))
                    stats = train_local(model, x, y, self.data.scale, self.data.shift, s.train, seed, omc=om)
                    stage = "encode"
                    up = om.to_payloads()
                finally:
                    om.release()
                tensors = [(k, up[k]) for k in start]
            else:
                mask = {k: v != 0 for k, v in base.items() if v.dim() >= 2} if s.pruning else None
                stats = train_local(model, x, y, self.data.scale, self.data.shift, s.train, seed, prox_mu=s.prox_mu,
                                    mask=mask)
                stage = "encode"
                params = model.state_dict()
                state = self._states.setdefault(cid, CodecState()) if s.codec in _STATEFUL else None
                tensors = [(k, self.codec.encode((params[k] - base[k]).cpu(), CodecContext(seed=seed, state=state, key=k)))
                           for k in base]
            train_s = time.perf_counter() - t0
            stage = "upload"
            msgs = serde.encode_upload(
                job_id=s.job_id, round=round, client_id=cid, weight=float(stats.examples), tensors=tensors,
                attempt=attempt, metrics={"loss": stats.loss, "train_s": train_s},
                subnet_seed=seed if sub is not None else 0, keep_rate=keep, weights=s.omc is not None,
            )
            server = servers[serde.shard_index(cid, len(servers))]
            ack = upload_with_retry(self._chan(server), msgs, client_token(s.secret, s.job_id, cid), attempt=attempt)
        except Exception as e:
            raise ClientError(stage, cid, round, e) from e
        flops = flops_per_example(self.layout, sub) * stats.examples * s.train.local_epochs
        mem = stats.param_memory_bytes or 4 * sum(int(v.numel()) for v in base.values())
        return ClientResult(cid, round, stats.examples, stats.loss, train_s, ack["wire_bytes"], keep_rate=keep,
                            flops=flops, param_memory_bytes=mem, eval_accuracy=ev[0], eval_loss=ev[1])

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


def upload_with_retry(channel: grpc.Channel, msgs, token: str, *, attempt: int = 0, tries: int = 6,
                      sent_before: bool = False) -> dict:
    """Upload one update (a `serde.WireUpload` or a message list), retrying with exponential
    back-off (or the server's hint) while the service is busy.

    ALREADY_EXISTS on a retried attempt (attempt > 0, a second try here, or `sent_before`: this
    update was in a call that broke) means an earlier send was committed and its ack lost: the
    update counts once, and this is success.

    Raises:
        grpc.RpcError: a non-retryable status, or still busy after `tries` tries.
    """
    delay = 0.05
    for i in range(tries):
        try:
            return serde.call_upload(channel, msgs, token=token)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS and (attempt > 0 or i > 0 or sent_before):
                return {"accepted": True, "bytes_received": 0, "round": 0, "client_id": 0,
                        "wire_bytes": serde.wire_nbytes(msgs), "duplicate": True}
            if e.code() not in _RETRYABLE or i == tries - 1:
                raise
            hint = serde.retry_after_ms(e)
            time.sleep(max(delay, (hint or 0) / 1000.0))
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")
