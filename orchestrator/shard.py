"""An aggregation shard: a Ray actor that runs the gRPC aggregation service."""

from __future__ import annotations

import threading
from typing import Mapping

import ray

from fedray.proto.serde import TLSConfig
from fedray.workers.pool import freeze_heap

from .aggregation import RunningWeightedSum
from .heap import start_heap_trimmer, trim_heap
from .privacy import DPSpec
from .service import AggregationCore, RoundClosedError, ServiceLimits, create_server
from .strategy import StrategySpec
from .sum_stream import STREAM_MIN_BYTES, piece_elements, pieces

__all__ = ["AggregationShard", "advertised_address", "bind_host"]

_WILDCARDS = ("0.0.0.0", "::", "[::]")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind_host(host: str | None, node_ip: str) -> str:
    """The address a shard binds: `host` if given, else all interfaces (loopback when the Ray node
    itself is on loopback, a local Ray: nothing else could dial it)."""
    if host:
        return host
    return "127.0.0.1" if node_ip.startswith("127.") else "0.0.0.0"


def advertised_address(bound: str, node_ip: str, port: int) -> str:
    """What workers on other nodes dial: the Ray node's IP for a wildcard bind, else the bound address."""
    return _join(node_ip if bound in _WILDCARDS else bound, port)



@ray.remote(num_cpus=0, max_concurrency=4)
class AggregationShard:
    """Owns one `AggregationCore` and its gRPC server, bound at start on `host` (None: see
    `bind_host`; port 0: any) and advertised at the Ray node's IP (`advertised_address`)."""

    def __init__(
        self, *, job_id: str, secret: str, shapes: Mapping[str, tuple[int, ...]], host: str | None = None,
        port: int = 0, limits: ServiceLimits = ServiceLimits(), max_workers: int | None = None,
        tls: TLSConfig | None = None, spec_json: str = "{}", num_rounds: int = 0, shard: tuple[int, int] = (0, 1),
        strategy: StrategySpec = StrategySpec(), privacy: DPSpec | None = None, max_clients: int = 1 << 16,
        codecs=None, dropout=None, layout=None, seed: int = 0, max_weight: float | None = None,
        worker_reduce: bool = False,
    ) -> None:
        import torch

        # first: Ray reports a failed __init__ through repr(), which must not fail in turn
        self._label = f"fedray job={job_id} role=aggregator shard={shard[0]} of={shard[1]}"
        torch.set_num_threads(1)  # concurrency comes from gRPC's threads; more torch threads only spin
        self._core = AggregationCore(
            job_id=job_id, secret=secret, shapes=shapes, limits=limits, spec_json=spec_json, num_rounds=num_rounds,
            shard=shard, strategy=strategy, privacy=privacy, max_clients=max_clients, codecs=codecs, dropout=dropout,
            layout=layout, seed=seed, max_weight=max_weight, worker_reduce=worker_reduce,
        )
        node_ip = ray.util.get_node_ip_address()
        bound = bind_host(host, node_ip)
        try:
            self._server, self._port = create_server(self._core, _join(bound, port), max_workers=max_workers, tls=tls)
        except (RuntimeError, OSError) as e:  # grpcio: "Failed to bind to address ..."; TLS files missing
            raise RuntimeError(
                f"aggregation shard {shard[0]} on node {node_ip} could not serve on {_join(bound, port)}: {e}. "
                "service.host must be an address of every node that may hold a shard (unset: all interfaces); "
                "service.port must be free there; TLS files must exist on that node"
            ) from None
        self._address = advertised_address(bound, node_ip, self._port)
        self._closed: tuple[int, RunningWeightedSum] | None = None  # the last closed round's sum (stream_sum)
        self._stopping = threading.Event()
        start_heap_trimmer(self._stopping)
        freeze_heap()  # as the worker actors do

    def __repr__(self) -> str:  # the Ray dashboard's Actors page shows it (column "Repr", filterable)
        return self._label

    def address(self) -> str:
        return self._address

    def open_round(self, round: int, broadcast) -> None:
        if self._closed is not None:  # the last round's sum, if the driver did not release it: freed first
            self._closed = None
            trim_heap()
        self._core.open_round(round, broadcast)

    def close_round(self, round: int, expect: int | None = None) -> dict | None:
        """Close the round. A running sum (the FedAvg family) of a model of `STREAM_MIN_BYTES` or
        more stays here: the answer carries its counters, `total_weight`, `sum_count` and
        `shapes`, with `agg` None and `streamed` True, and the driver takes the mean in pieces
        (`stream_sum`); any other collector is returned whole under `agg`. With `expect`: close
        once that many updates are committed, or return None (`AggregationCore.close_round`)."""
        part = self._core.close_round(round, expect)
        if part is None:
            return None
        part.pop("sums", None)  # the same tensors as part["agg"].sums
        agg = part["agg"]
        if type(agg) is RunningWeightedSum and 4 * sum(v.numel() for v in agg.sums.values()) >= STREAM_MIN_BYTES:
            self._closed = (round, agg)
            part.update(agg=None, streamed=True, sum_count=agg.count,
                        shapes={k: tuple(v.shape) for k, v in agg.sums.items()})
        return part

    def stream_sum(self, round: int, total_weight: float):
        """Generator: round `round`'s closed sum / `total_weight` (all shards' weight) as float32
        pieces small enough to travel inline (orchestrator/sum_stream.py); call it with
        `.options(num_returns="streaming")`. The sum is kept until `release_round` or the next open.

        Raises:
            RoundClosedError: round `round` was not closed here with a running sum, or was released.
        """
        closed = self._closed
        if closed is None or closed[0] != round:
            raise RoundClosedError(f"round {round}: no closed running sum is held (closed or released?)")
        yield from pieces(closed[1].sums, total_weight, piece_elements())

    def release_round(self, round: int) -> None:
        """Free round `round`'s closed sum (the driver has its mean)."""
        closed = self._closed
        if closed is not None and closed[0] == round:
            self._closed = closed = None
            trim_heap()

    def set_addresses(self, addresses) -> None:
        self._core.set_addresses(tuple(addresses))

    def committed(self, round: int) -> int:
        return self._core.committed(round)

    def finish(self) -> None:
        self._closed = None
        self._core.finish()

    def ping(self) -> bool:
        return True

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop(grace=1.0)
