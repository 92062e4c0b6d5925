"""The job driver: the round loop.

One round: sample clients (seeded), encode the global model with the broadcast codec and put it
into Ray's object store once, open the round on the aggregation shard, hand batches of client
ids to the worker pool (which train and upload over gRPC), close the round to get the shard's
running sum, apply the strategy, evaluate on the held-out test set, record metrics.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from fedray.compression import get_codec
from fedray.workers.client import TrainerSetup
from fedray.workers.data import load_dataset, partition
from fedray.workers.models import build_model, get_params, num_params, set_params
from fedray.workers.pool import RayPool, default_num_workers
from fedray.workers.train import TrainConfig, evaluate

from .aggregation import FedAvg, RunningWeightedSum
from .metrics import JobMetrics
from .shard import AggregationShard
from .spec import JobSpec

__all__ = ["JobError", "JobResult", "RoundRecord", "ensure_ray", "run_job", "sample_clients"]


class JobError(RuntimeError):
    """The job could not go on; the message says which round and why."""


@dataclass(frozen=True)
class RoundRecord:
    round: int
    clients: int
    failed: int
    accuracy: float
    loss: float
    bytes_up: int
    bytes_down: int
    bytes_up_fp32: int
    bytes_down_fp32: int
    wall_s: float
    train_loss: float


@dataclass
class JobResult:
    job_id: str
    spec: JobSpec
    rounds: list[RoundRecord] = field(default_factory=list)
    wall_s: float = 0.0
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy if self.rounds else float("nan")

    def totals(self) -> dict[str, int]:
        keys = ("bytes_up", "bytes_down", "bytes_up_fp32", "bytes_down_fp32")
        return {k: sum(getattr(r, k) for r in self.rounds) for k in keys}

    def summary(self) -> dict:
        """The JSON summary (the CLI's --json contract)."""
        t = self.totals()
        return {
            "job_id": self.job_id,
            "final_accuracy": self.final_accuracy,
            "wall_s": self.wall_s,
            "bytes_up_total": t["bytes_up"],
            "bytes_down_total": t["bytes_down"],
            "bytes_up_fp32": t["bytes_up_fp32"],
            "bytes_down_fp32": t["bytes_down_fp32"],
            "codec": self.spec.compression.codec,
            "broadcast": self.spec.compression.broadcast,
            "rounds": [asdict(r) for r in self.rounds],
            "spec": self.spec.to_dict(),
        }

    def write_json(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.summary(), indent=2))


def sample_clients(num_clients: int, k: int, seed: int, round: int) -> np.ndarray:
    """The clients of one round: k distinct ids, from (seed, round) alone."""
    rng = np.random.default_rng([seed, round, 0x5A3])
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def ensure_ray(num_cpus: int | None = None, *, include_dashboard: bool = False) -> bool:
    """Connect to Ray: the cluster in RAY_ADDRESS if set, else a fresh embedded local one.

    Returns True when this call started a local Ray (the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    # Keep every Ray port on 127.0.0.1 (research/environment.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING", log_to_driver=True)
        return False
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, logging_level="WARNING",
        object_store_memory=512 << 20, configure_logging=True,
    )
    return True


def run_job(
    spec: JobSpec, *, progress: bool = True, log: Callable[[str], None] = print,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> JobResult:
    """Run `spec` on the connected Ray cluster (see `ensure_ray`) and return its result.

    Raises:
        DatasetMissingError: the data set is not on this machine.
        JobError: every client of a round failed.
    """
    if not ray.is_initialized():
        raise JobError("Ray is not initialized: call fedray.orchestrator.engine.ensure_ray() first")
    t_job = time.perf_counter()
    job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
    secret = secrets.token_hex(16)
    data = load_dataset(spec.data.dataset, spec.data.data_dir, spec.seed)
    parts = partition(data.y_train, spec.data.num_clients, method=spec.data.partition, alpha=spec.data.alpha, seed=spec.seed)

    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = build_model(spec.model.kind, data.input_shape, data.num_classes, spec.model.hidden)
    params = get_params(model)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    fp32_bytes = 4 * num_params(params)
    comp = spec.compression
    bcodec = get_codec(comp.broadcast, **dict(comp.broadcast_params))
    strategy = FedAvg(server_lr=spec.training.server_lr)
    metrics = JobMetrics(spec.name, comp.codec)

    shard = AggregationShard.options(name=f"{job_id}:aggregator-0").remote(job_id=job_id, secret=secret, shapes=shapes)
    server = ray.get(shard.address.remote())
    tr = spec.training
    setup = TrainerSetup(
        job_id=job_id, secret=secret, server=server, seed=spec.seed, model_kind=spec.model.kind,
        hidden=spec.model.hidden, train=TrainConfig(tr.local_epochs, tr.batch_size, tr.lr, tr.momentum),
        codec=comp.codec, codec_params=dict(comp.codec_params), broadcast=comp.broadcast,
        broadcast_params=dict(comp.broadcast_params),
    )
    res = spec.resources
    pool = RayPool(
        setup, data, parts, num_workers=res.num_workers or default_num_workers(), clients_per_call=res.clients_per_call,
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, job_name=job_id,
    )
    log(f"fedray job {job_id}: {spec.data.num_clients} clients on {spec.data.dataset}, "
        f"{tr.clients_per_round} per round, {tr.rounds} rounds, codec {comp.codec}, aggregation service at {server}")
    result = JobResult(job_id, spec)
    try:
        for r in range(1, tr.rounds + 1):
            t0 = time.perf_counter()
            ids = sample_clients(spec.data.num_clients, tr.clients_per_round, spec.seed, r)
            bcast = tuple((k, bcodec.encode(v)) for k, v in params.items())
            down_per_client = sum(p.nbytes for _, p in bcast)
            bref = ray.put(bcast)  # once per round; every worker and the shard read this one copy
            ray.get(shard.open_round.remote(r, bref))
            bar = tqdm(total=len(ids), desc=f"round {r}/{tr.rounds}", unit="client", disable=not progress, leave=True)
            try:
                results = pool.run_round(r, bref, ids, on_batch=lambda b: bar.update(len(b)))
                part = ray.get(shard.close_round.remote(r))
                ok = [x for x in results if x.error is None]
                failed = [x for x in results if x.error is not None]
                for x in failed[:3]:
                    log(f"round {r}: {x.error}")
                if part["count"] == 0:
                    raise JobError(f"round {r}: no client update arrived ({len(failed)} failed); first error: "
                                   f"{failed[0].error if failed else 'none'}")
                agg = RunningWeightedSum(shapes)
                agg.sums, agg.total_weight, agg.count = part["sums"], part["total_weight"], part["count"]
                params = strategy.apply(params, agg)
                set_params(model, params)
                acc, loss = evaluate(model, data.x_test, data.y_test, data.scale, data.shift)
                wall = time.perf_counter() - t0
                rec = RoundRecord(
                    round=r, clients=part["count"], failed=len(failed), accuracy=acc, loss=loss,
                    bytes_up=sum(x.bytes_up for x in ok), bytes_down=down_per_client * len(ids),
                    bytes_up_fp32=fp32_bytes * len(ok), bytes_down_fp32=fp32_bytes * len(ids), wall_s=wall,
                    train_loss=float(np.mean([x.loss for x in ok])) if ok else float("nan"),
                )
                bar.set_postfix(acc=f"{acc:.4f}", up=_mb(rec.bytes_up), down=_mb(rec.bytes_down))
            finally:
                bar.close()
            result.rounds.append(rec)
            metrics.record_round(
                round=r, ok=len(ok), failed=len(failed), bytes_up=rec.bytes_up, bytes_down=rec.bytes_down,
                fp32_up=rec.bytes_up_fp32, accuracy=acc, wall_s=wall, decode_s=part["decode_s"], broadcast_codec=comp.broadcast,
            )
            if not progress:
                log(f"round {r}/{tr.rounds}: accuracy {acc:.4f}, clients {rec.clients}, up {_mb(rec.bytes_up)}, "
                    f"down {_mb(rec.bytes_down)}, {wall:.2f}s")
            if on_round:
                on_round(rec)
    finally:
        pool.shutdown()
        ray.get(shard.stop.remote())
        ray.kill(shard)
    result.params = params
    result.wall_s = time.perf_counter() - t_job
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}MB"


def format_summary(result: JobResult) -> str:
    """A human-readable summary of a finished job."""
    t = result.totals()
    up_ratio = t["bytes_up"] / max(t["bytes_up_fp32"], 1)
    down_ratio = t["bytes_down"] / max(t["bytes_down_fp32"], 1)
    lines = [
        f"job {result.job_id} finished in {result.wall_s:.1f}s",
        f"  final accuracy   {result.final_accuracy:.4f}",
        f"  bytes up         {_mb(t['bytes_up'])} ({up_ratio:.1%} of fp32's {_mb(t['bytes_up_fp32'])}, "
        f"codec {result.spec.compression.codec})",
        f"  bytes down       {_mb(t['bytes_down'])} ({down_ratio:.1%} of fp32's {_mb(t['bytes_down_fp32'])}, "
        f"codec {result.spec.compression.broadcast})",
        "  round  clients  accuracy  up        down      wall",
    ]
    for r in result.rounds:
        lines.append(f"  {r.round:5d}  {r.clients:7d}  {r.accuracy:8.4f}  {_mb(r.bytes_up):>8}  {_mb(r.bytes_down):>8}  {r.wall_s:5.2f}s")
    return "\n".join(lines)
