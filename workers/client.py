"""What one worker does for a batch of virtual clients: decode the broadcast model once, then per
client train locally, encode the update with the job's codec and stream it to the aggregation
service over gRPC. Plain Python: `pool.py` runs it inside Ray actors, tests run it in-process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import grpc
import torch

from fedray.compression.payload import Payload
from fedray.proto import serde
from fedray.proto.auth import client_token
from fedray.task import overrides as _overrides

from .batched import batching_pays, population_pad, train_batched_stacked
from .broadcast import Broadcast, decode_broadcast, decode_tensors
from .data import as_arrays
from .models import set_params
from .reduce import partial_sums, partial_sums_encoded, upload_partial
from .seeds import client_seeds
from .step import ClientError, ClientStep, client_seed, train_config
from .train import TrainConfig, pick_device

__all__ = [
    "ClientError", "ClientResult", "ClientTrainer", "TrainerSetup", "client_seed", "decode_model", "upload_with_retry",
]

_RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass(frozen=True)
class TrainerSetup:
    """Everything a worker needs for the whole job (sent once, at start)."""

    job_id: str
    secret: str
    seed: int
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
    worker_reduce: bool = False  # upload one partial sum per shard and call (workers/reduce.py)

    @classmethod
    def from_spec(cls, spec, *, job_id: str, secret: str = "", **overrides) -> "TrainerSetup":
        """The client-side settings of a typed `JobSpec`: the one conversion that worker actors
        and real clients both use."""
        tr, comp, res = spec.training, spec.compression, spec.resources
        kw = dict(
            job_id=job_id, secret=secret, seed=spec.seed, train=train_config(tr), codec=comp.codec,
            codec_params=dict(comp.codec_params), broadcast=comp.broadcast, broadcast_params=dict(comp.broadcast_params),
            tls_ca_file=spec.service.tls_ca or spec.service.tls_cert, tls_server_name=spec.service.tls_server_name,
            dropout=spec.dropout,
            omc=spec.omc, prox_mu=spec.strategy.proximal_mu,
            batched=res.batched, pruning=spec.pruning is not None, device=res.device, client_eval=tr.client_eval,
            worker_reduce=res.worker_reduce,
        )
        kw.update(overrides)
        return cls(**kw)


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
    eval_metrics: Mapping[str, float] | None = None  # every metric the task's evaluate returned


def decode_model(stage_tensors: Sequence[tuple[str, Payload]], codec_name: str, codec_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return decode_tensors(stage_tensors, codec_name, codec_params)


class ClientTrainer:
    """Trains many virtual clients per call; one instance per worker actor."""

    def __init__(self, setup: TrainerSetup, task) -> None:
        torch.set_num_threads(setup.torch_threads)
        self.setup = setup
        self.task = task
        # OMC keeps its packed parameters in numpy on the host: it trains on the CPU.
        self.device = pick_device("cpu" if setup.omc is not None else setup.device)
        self.step = ClientStep(setup, task, self.device)
        self.model, self.codec = self.step.model, self.step.codec
        self._channels: dict[str, grpc.Channel] = {}
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None
        self._pad: tuple[int | None] | None = None  # (batched training's pad_to,), once known

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
        return [self._one_result(round, start, int(cid), servers, attempt, broadcast) for cid in client_ids]

    def _batchable(self) -> bool:
        s = self.setup
        return (s.batched and s.dropout is None and s.omc is None and not s.prox_mu and not s.pruning
                and not self.step.custom_train and self.device.type == "cpu" and batching_pays(self.model))

    def _pad_to(self) -> int | None:
        """Batched training's padded width for this job: its largest client's size where every
        client fits one batch (from the task's own `client_sizes`; the default one would load
        every client's data, so a task without its own gets the batch size)."""
        if self._pad is None:
            sizes = self.task.client_sizes() if _overrides(self.task, "client_sizes") else None
            self._pad = (population_pad(None if callable(sizes) else sizes, self.setup.train.batch_size),)
        return self._pad[0]

    def _batched(self, round: int, start, cids: list[int], servers, attempt: int) -> list[ClientResult]:
        """Train every client of the call as one batched computation, then encode and upload each."""
        s, out = self.setup, {}
        arrays = {}
        for c in cids:
            try:
                data = self.step.data(round, c)
                arrays[c] = (data, as_arrays(data))
            except (ClientError, ValueError) as e:
                out[c] = ClientResult(c, round, error=str(e if isinstance(e, ClientError) else ClientError("data", c, round, e)))
        ok = [c for c in cids if c in arrays]
        if len({(a[2], a[3]) for _, a in arrays.values()}) > 1:  # inputs scaled differently: one by one
            return [out.get(c) or self._one_result(round, start, c, servers, attempt, None) for c in cids]
        if not ok:
            return [out[c] for c in cids]
        seeds = client_seeds(s.seed, round, ok).tolist()  # = [client_seed(s.seed, round, c) for c in ok]
        evals = {}
        if s.client_eval:
            set_params(self.model, start)
            evals = {c: dict(self.task.evaluate(self.model, arrays[c][0])) for c in ok}
        _, _, scale, shift = arrays[ok[0]][1]
        t0 = time.perf_counter()
        try:
            stacked, trained = train_batched_stacked(self.model, start, [arrays[c][1][0] for c in ok],
                                                     [arrays[c][1][1] for c in ok], s.train, seeds, scale, shift,
                                                     pad_to=self._pad_to())
        except Exception as e:  # the whole batch failed in training: report each client
            out.update({c: ClientResult(c, round, error=str(ClientError("train", c, round, e))) for c in ok})
            return [out[c] for c in cids]
        train_s = (time.perf_counter() - t0) / len(ok)
        mem = 4 * sum(int(v.numel()) for v in start.values())
        encoded = []
        if not self.codec.stateful and s.worker_reduce:  # one partial sum per shard: no client's own upload is built
            deltas = {k: stacked[k] - start[k] for k in start}
            return self._reduced_many(round, cids, ok, trained, deltas, servers, attempt, train_s, mem, evals, out)
        if not self.codec.stateful:  # stateless codec: encode each tensor for all clients at once
            try:
                per = self.codec.encode_batch({k: stacked[k] - start[k] for k in start})
            except Exception as e:
                out.update({c: ClientResult(c, round, error=str(ClientError("encode", c, round, e))) for c in ok})
                return [out[c] for c in cids]
            for i, (cid, stats) in enumerate(zip(ok, trained)):
                msgs = serde.encode_upload(
                    job_id=s.job_id, round=round, client_id=cid, weight=float(stats.examples),
                    tensors=[(k, per[k][i]) for k in start], attempt=attempt,
                    metrics={"loss": stats.loss, "train_s": train_s},
                )
                encoded.append((cid, stats, [(k, per[k][i]) for k in start], msgs))
        else:
            for i, (cid, seed, stats) in enumerate(zip(ok, seeds, trained)):
                params = {k: v[i] for k, v in stacked.items()}
                try:
                    tensors = self.step.encode(round, cid, seed, params, start)
                    encoded.append((cid, stats, tensors, serde.encode_upload(
                        job_id=s.job_id, round=round, client_id=cid, weight=float(stats.examples), tensors=tensors,
                        attempt=attempt, metrics={"loss": stats.loss, "train_s": train_s})))
                except ClientError as e:
                    out[cid] = ClientResult(cid, round, error=str(e))
        stats_of = {c: x for c, x, _, _ in encoded}
        uploads = (self._reduced(round, min(cids), encoded, servers, attempt)
                   if s.worker_reduce else self._upload_many(round, [(c, m) for c, _, _, m in encoded], servers, attempt))
        for cid, nbytes, err in uploads:
            st = stats_of[cid]
            ev = evals.get(cid)
            out[cid] = (ClientResult(cid, round, error=err) if err else
                        ClientResult(cid, round, st.examples, st.loss, train_s, nbytes,
                                     flops=self.step.flops(None, st.examples), param_memory_bytes=mem,
                                     **_eval_fields(ev)))
        return [out[c] for c in cids]

    def _reduced(self, round: int, first: int, encoded: list, servers, attempt: int):
        """`resources.worker_reduce`: one partial sum per shard instead of each client's update;
        each client is charged its own encoded upload's bytes. Yields as `_upload_many`."""
        s = self.setup
        parts = partial_sums(self.codec, [(c, float(st.examples), st.loss, t) for c, st, t, _ in encoded], len(servers))
        wire = {c: serde.wire_nbytes(m) for c, _, _, m in encoded}
        for shard, part in parts.items():
            try:
                upload_partial(self._chan(servers[shard]), part, shard=shard, num_shards=len(servers), first_client=first,
                               job_id=s.job_id, secret=s.secret, round=round, attempt=attempt, upload=upload_with_retry)
            except Exception as e:
                for cid in part.clients:
                    yield cid, 0, str(ClientError("upload", cid, round, e))
                continue
            for cid in part.clients:
                yield cid, wire[cid], None

    def _reduced_many(self, round: int, cids: list[int], ok: list[int], trained, deltas: dict, servers, attempt: int,
                      train_s: float, mem: int, evals: dict, out: dict) -> list[ClientResult]:
        """`_reduced` for a stateless codec: the clients' updates (`deltas[name][i]`) encoded and
        each shard's clients folded in one step (`partial_sums_encoded`), each client charged its
        own upload's exact wire bytes (`serde.upload_nbytes_many`), one upload per shard."""
        s, names = self.setup, list(deltas)
        weights, losses = [float(st.examples) for st in trained], [st.loss for st in trained]
        try:
            templates, parts = partial_sums_encoded(self.codec, ok, weights, losses, deltas, len(servers))
            wire = serde.upload_nbytes_many(
                job_id=s.job_id, round=round, attempt=attempt, tensors=[(k, templates[k]) for k in names],
                clients=[(c, w, {"loss": loss, "train_s": train_s}) for c, w, loss in zip(ok, weights, losses)])
        except Exception as e:
            out.update({c: ClientResult(c, round, error=str(ClientError("encode", c, round, e))) for c in ok})
            return [out[c] for c in cids]
        nbytes, stats = dict(zip(ok, wire)), dict(zip(ok, trained))
        flops = {}
        for shard, part in parts.items():
            try:
                upload_partial(self._chan(servers[shard]), part, shard=shard, num_shards=len(servers), first_client=min(cids),
                               job_id=s.job_id, secret=s.secret, round=round, attempt=attempt, upload=upload_with_retry)
                err = None
            except Exception as e:
                err = e
            for cid in part.clients:
                st = stats[cid]
                if err is not None:
                    out[cid] = ClientResult(cid, round, error=str(ClientError("upload", cid, round, err)))
                    continue
                if st.examples not in flops:
                    flops[st.examples] = self.step.flops(None, st.examples)
                out[cid] = ClientResult(cid, round, st.examples, st.loss, train_s, nbytes[cid], flops=flops[st.examples],
                                        param_memory_bytes=mem, **_eval_fields(evals.get(cid)))
        return [out[c] for c in cids]

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
        o = self.step.run(round, start, cid, broadcast)
        try:
            msgs = serde.encode_upload(
                job_id=s.job_id, round=round, client_id=cid, weight=float(o.examples), tensors=o.tensors,
                attempt=attempt, metrics={"loss": o.loss, "train_s": o.train_s},
                subnet_seed=o.subnet_seed, keep_rate=o.keep_rate, weights=o.weights,
            )
            server = servers[serde.shard_index(cid, len(servers))]
            ack = upload_with_retry(self._chan(server), msgs, client_token(s.secret, s.job_id, cid), attempt=attempt)
        except Exception as e:
            raise ClientError("upload", cid, round, e) from e
        return ClientResult(cid, round, o.examples, o.loss, o.train_s, ack["wire_bytes"], keep_rate=o.keep_rate,
                            flops=o.flops, param_memory_bytes=o.param_memory_bytes, **_eval_fields(o.eval_metrics))

    def _one_result(self, round, start, cid, servers, attempt, broadcast) -> ClientResult:
        try:
            return self._one(round, start, int(cid), servers, attempt, broadcast)
        except ClientError as e:
            return ClientResult(int(cid), round, error=str(e))

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


def _eval_fields(ev: Mapping[str, float] | None) -> dict:
    if ev is None:
        return {}
    return {"eval_accuracy": ev.get("accuracy"), "eval_loss": ev.get("loss"), "eval_metrics": dict(ev)}


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
