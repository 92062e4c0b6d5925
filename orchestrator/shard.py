"""An aggregation shard: a Ray actor that runs the gRPC aggregation service."""

from __future__ import annotations

from typing import Mapping

import ray

from fedray.proto.serde import TLSConfig
from fedray.workers.pool import freeze_heap

from .privacy import DPSpec
from .service import AggregationCore, ServiceLimits, create_server
from .strategy import StrategySpec

__all__ = ["AggregationShard", "fix_mmap_threshold"]


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Make glibc serve every block of `nbytes` or more from its own mapping, given back on free.

    By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, after
    which the next round's float64 sums and upload buffers come from the heap, which keeps them:
    a 100M-parameter model's shard grew by about 2x fp32 a round (benchmarks/big_model.py).
    No-op where libc has no `mallopt`.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


@ray.remote(num_cpus=0, max_concurrency=4)
class AggregationShard:
    """Owns one `AggregationCore` and its gRPC server, bound at start on `host` (port 0: any)."""

    def __init__(
        self, *, job_id: str, secret: str, shapes: Mapping[str, tuple[int, ...]], host: str = "127.0.0.1",
        port: int = 0, limits: ServiceLimits = ServiceLimits(), max_workers: int | None = None,
        tls: TLSConfig | None = None, spec_json: str = "{}", num_rounds: int = 0, shard: tuple[int, int] = (0, 1),
        strategy: StrategySpec = StrategySpec(), privacy: DPSpec | None = None, max_clients: int = 1 << 16,
        codecs=None, dropout=None, layout=None, seed: int = 0,
    ) -> None:
        import torch

        torch.set_num_threads(1)  # concurrency comes from gRPC's threads; more torch threads only spin
        fix_mmap_threshold()
        self._core = AggregationCore(
            job_id=job_id, secret=secret, shapes=shapes, limits=limits, spec_json=spec_json, num_rounds=num_rounds,
            shard=shard, strategy=strategy, privacy=privacy, max_clients=max_clients, codecs=codecs, dropout=dropout,
            layout=layout, seed=seed,
        )
        self._server, self._port = create_server(self._core, f"{host}:{port}", max_workers=max_workers, tls=tls)
        self._host = host
        freeze_heap()  # as the worker actors do

    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def open_round(self, round: int, broadcast) -> None:
        self._core.open_round(round, broadcast)

    def close_round(self, round: int) -> dict:
        part = self._core.close_round(round)
        part.pop("sums", None)  # the same tensors as part["agg"].sums: sent once, out of band (RunningWeightedSum)
        return part

    def set_addresses(self, addresses) -> None:
        self._core.set_addresses(tuple(addresses))

    def committed(self, round: int) -> int:
        return self._core.committed(round)

    def finish(self) -> None:
        self._core.finish()

    def ping(self) -> bool:
        return True

    def stop(self) -> None:
        self._server.stop(grace=1.0)
