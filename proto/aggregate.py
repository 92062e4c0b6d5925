"""Reserved upload identities for a worker's partial sum (`resources.worker_reduce`).

A worker that reduces uploads one update per shard and call: the weighted mean of its clients'
decoded updates, under the weight of all their examples, with the number of clients it stands
for in its `clients` metric. Its identity lies above every population (ids from
`AGGREGATE_BASE`), is derived from the call's smallest client id (a retried call gets the same
identity, so the service's exactly-once check holds per call) and lands on the shard it is for.
Its token is minted from the job secret like any client's; a shard accepts these identities only
in a job that declared `worker_reduce`.
"""

from __future__ import annotations

from .serde import shard_index

__all__ = ["AGGREGATE_BASE", "CLIENTS_METRIC", "aggregate_id", "is_aggregate_id"]

AGGREGATE_BASE = 1 << 62
CLIENTS_METRIC = "clients"
_SPAN = 1 << 12  # candidate ids per call: one lands on each of up to 256 shards but with ~1e-7 odds


def is_aggregate_id(client_id: int) -> bool:
    return int(client_id) >= AGGREGATE_BASE


def aggregate_id(first_client: int, shard: int, num_shards: int) -> int:
    """The identity of the partial sum of the call whose smallest client id is `first_client`,
    for `shard` of `num_shards`.

    Raises:
        ValueError: no candidate id hashes to that shard (odds about (1 - 1/num_shards) ** 4096).
    """
    base = AGGREGATE_BASE + int(first_client) * _SPAN
    for j in range(_SPAN):
        if shard_index(base + j, num_shards) == shard:
            return base + j
    raise ValueError(f"no aggregate id of client {first_client} maps to shard {shard} of {num_shards}")
