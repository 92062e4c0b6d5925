"""A worker's partial sum per shard (`resources.worker_reduce`): the simulation fast path for
linear aggregation (FedAvg and its server optimizers, no clipping, DP, robust aggregation,
dropout or pruning).

Every client's update is encoded with the job's codec exactly as a real client would send it,
then folded here exactly as the shard folds an upload (`Codec.fold` into a float64
`RunningWeightedSum`, weighted by its examples; so the compression error is the real one). One update per shard and call goes over the same gRPC
service: the weighted mean as fp32 (`identity`) under the weight of all the examples, so the
shard's weighted sum gains exactly what the clients' own uploads would have added. Each client
is still charged the bytes of its own encoded upload.

Exactly-once holds per call: the partial sum's identity comes from the call's smallest client
id (`proto/aggregate.py`), and a call that fails (a worker that died) is retried whole, with the
same clients, so an aggregate that was committed before the failure answers ALREADY_EXISTS and
counts once; a failed upload fails all the clients it carries.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import grpc
import torch

from fedray.compression import get_codec
from fedray.orchestrator.aggregation import RunningWeightedSum
from fedray.proto import serde
from fedray.proto.aggregate import CLIENTS_METRIC, aggregate_id
from fedray.proto.auth import client_token

__all__ = ["PartialSum", "partial_sums", "partial_sums_encoded", "partial_sums_many", "upload_partial"]


class PartialSum:
    """The weighted sum of one shard's clients of one call, added as the shard adds uploads:
    `Codec.fold` of each payload into a float64 `RunningWeightedSum`, weight = examples."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.acc = RunningWeightedSum(shapes)
        self.loss, self.clients = 0.0, []

    @property
    def weight(self) -> float:
        return self.acc.total_weight

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        return self.acc.sums

    def add(self, codec, cid: int, weight: float, loss: float, tensors: list) -> None:
        self.acc.add_folds({k: codec.fold(p) for k, p in tensors}, weight)
        self.loss += weight * loss if math.isfinite(loss) else 0.0
        self.clients.append(cid)


    def add_many(self, codec, cids: Sequence[int], weights: Sequence[float], losses: Sequence[float],
                 tensors: Mapping[str, Sequence]) -> None:
        """`add` for many clients at once (`tensors[name][i]`: client i's payload): each tensor of
        all of them in one `Codec.fold_many`; the same sums as `add` one client after the other."""
        _check_weights(weights)
        if set(tensors) != set(self.acc.sums):
            raise ValueError(f"update tensors {sorted(tensors)} != expected {sorted(self.acc.sums)}")
        for k, ps in tensors.items():
            codec.fold_many(ps, weights, self.acc.sums[k].view(-1))
        self.tally(cids, weights, losses)

    def tally(self, cids: Sequence[int], weights: Sequence[float], losses: Sequence[float]) -> None:
        """Count clients whose updates were added to the sums: their weights, losses and ids."""
        for w, loss in zip(weights, losses):
            self.acc.total_weight += w
            self.loss += w * loss if math.isfinite(loss) else 0.0
        self.acc.count += len(cids)
        self.clients.extend(cids)


def _check_weights(weights: Sequence[float]) -> None:
    for w in weights:
        if not w > 0 or not math.isfinite(w):
            raise ValueError(f"update weight must be finite and > 0, got {w}")


def _by_shard(cids: Sequence[int], num_shards: int) -> dict[int, list[int]]:
    """{shard: indices into `cids` of its clients}, in order."""
    if num_shards == 1:
        return {0: list(range(len(cids)))} if len(cids) else {}
    out: dict[int, list[int]] = {}
    for i, cid in enumerate(cids):
        out.setdefault(serde.shard_index(cid, num_shards), []).append(i)
    return out


def partial_sums_encoded(codec, cids: Sequence[int], weights: Sequence[float], losses: Sequence[float],
                         xs: Mapping[str, torch.Tensor], num_shards: int) -> tuple[dict, dict[int, PartialSum]]:
    """`encode_batch(xs)` then `partial_sums_many` of the payloads in one step
    (`Codec.encode_fold_batch`: no per-client payload where the codec can skip it; the same
    sums). `xs[name][i]` is client i's update. Returns ({name: client 0's payload}, {shard:
    PartialSum}).

    Raises:
        ValueError: a weight is not finite and > 0. PayloadError: an update does not encode.
    """
    _check_weights(weights)
    by_shard = _by_shard(cids, num_shards)
    templates, sums = codec.encode_fold_batch(xs, list(by_shard.values()), weights)
    out: dict[int, PartialSum] = {}
    for (shard, idx), got in zip(by_shard.items(), sums):
        part = out[shard] = PartialSum({k: tuple(v.shape[1:]) for k, v in xs.items()})
        for k, v in got.items():
            part.acc.sums[k].add_(v.view_as(part.acc.sums[k]))
        part.tally([cids[i] for i in idx], [weights[i] for i in idx], [losses[i] for i in idx])
    return templates, out


def partial_sums_many(codec, cids: Sequence[int], weights: Sequence[float], losses: Sequence[float],
                      tensors: Mapping[str, Sequence], num_shards: int) -> dict[int, PartialSum]:
    """`partial_sums` of clients given column-wise (`tensors[name][i]`: client i's payload, as
    `Codec.encode_batch` returns them), each tensor of a shard's clients folded at once."""
    out: dict[int, PartialSum] = {}
    for shard, idx in _by_shard(cids, num_shards).items():
        part = out[shard] = PartialSum({k: tuple(ps[0].shape) for k, ps in tensors.items()})
        part.add_many(codec, [cids[i] for i in idx], [weights[i] for i in idx], [losses[i] for i in idx],
                      {k: [ps[i] for i in idx] for k, ps in tensors.items()})
    return out


def partial_sums(codec, updates: Sequence[tuple[int, float, float, list]], num_shards: int) -> dict[int, PartialSum]:
    """{shard: PartialSum} of `updates`: (client id, weight, loss, [(name, encoded Payload)])."""
    out: dict[int, PartialSum] = {}
    for cid, weight, loss, tensors in updates:
        shard = serde.shard_index(cid, num_shards)
        if shard not in out:
            out[shard] = PartialSum({k: tuple(p.shape) for k, p in tensors})
        out[shard].add(codec, cid, weight, loss, tensors)
    return out


def upload_partial(channel: grpc.Channel, part: PartialSum, *, shard: int, num_shards: int, first_client: int,
                   job_id: str, secret: str, round: int, attempt: int, upload) -> int:
    """Upload one shard's partial sum with `upload` (`client.upload_with_retry`); return its wire bytes.

    Raises:
        grpc.RpcError: the shard refused it (or stayed busy through every retry).
    """
    ident = get_codec("identity")
    agg = aggregate_id(first_client, shard, num_shards)
    tensors = [(k, ident.encode((v / part.weight).to(torch.float32))) for k, v in part.sums.items()]
    msgs = serde.encode_upload(job_id=job_id, round=round, client_id=agg, weight=part.weight, tensors=tensors,
                               attempt=attempt, metrics={"loss": part.loss / part.weight,
                                                         CLIENTS_METRIC: float(len(part.clients))})
    return upload(channel, msgs, client_token(secret, job_id, agg), attempt=attempt)["wire_bytes"]
