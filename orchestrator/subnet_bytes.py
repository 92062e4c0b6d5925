"""Bytes down under Federated Dropout: each client downloads only its own sub-model.

The driver encodes the full global model once per round (workers cut their sub-model from it),
but a real deployment sends each client just the tensors of its subnet. This module prices that
download: per client, the subnet is regenerated from (job seed, round, client), exactly as the
worker and the shard regenerate it, the sub-model is cut from the round's global model and
encoded with the job's broadcast codec, and the encoded sizes are summed.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from fedray.compression.fd import ModelLayout, SubnetSpec, extract, keep_rate_for
from fedray.workers.step import client_seed

__all__ = ["client_subnet", "subnet_bytes_down"]


def client_subnet(dropout, *, job_seed: int, round: int, client_id: int) -> SubnetSpec:
    """The subnet of `client_id` in `round` under the job's `dropout` spec (a `DropoutSpec`)."""
    keep = keep_rate_for(client_id, round, dropout, seed=job_seed)  # a DropoutSpec is a KeepRateConfig
    return SubnetSpec(seed=client_seed(job_seed, round, client_id), keep_rate=keep, policy=dropout.policy,
                      round=round, client=client_id)


def subnet_bytes_down(params: Mapping[str, torch.Tensor], layout: ModelLayout, dropout, *, job_seed: int,
                      round: int, client_ids: Iterable[int],
                      encoded_bytes: Callable[[Mapping[str, torch.Tensor]], int]) -> int:
    """Sum over `client_ids` of `encoded_bytes(sub-model)`: what the clients of one round download.

    `encoded_bytes` encodes named tensors with the job's broadcast codec and returns the bytes a
    client receives before it trains (e.g. `make_broadcast(...).bytes_used()`).
    """
    total = 0
    for cid in client_ids:
        spec = client_subnet(dropout, job_seed=job_seed, round=round, client_id=int(cid))
        total += int(encoded_bytes(extract(params, layout, spec)))
    return total
