"""The job driver: the round loop.

One round: sample clients (seeded), encode the global model with the broadcast codec and put it
into Ray's object store once, open the round on the aggregation shard, hand batches of client
ids to the worker pool (which train and upload over gRPC), close the round to get the shard's
running sum, apply the strategy, evaluate on the held-out test set, record metrics.
"""

from __future__ import annotations

import json
import logging
import math
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

from fedray.workers.client import TrainerSetup
from fedray.compression.fd import CountedSum, apply_mask, cubic_sparsity, magnitude_mask
from fedray.compression.omc import quantizable_names
from fedray.workers.broadcast import PickledOnce, decode_broadcast, make_broadcast
from fedray.workers.models import get_params, num_params, set_params
from fedray.workers.pool import RayPool, default_num_workers

from fedray.proto import serde
from fedray.proto.serde import TLSConfig

from .checkpoint import open_store
from .cluster_env import apply_cluster_env
from .metrics import JobMetrics
from .population import Population
from .privacy import add_gaussian_noise, noise_generator, noise_secret
from .strategy import aggregate_metrics
from .shard import AggregationShard
from .spec import JobSpec
from .state import JobError, JobState, JobStateMachine
from .subnet_bytes import subnet_bytes_down
from .sum_stream import StreamedMean, receive

__all__ = ["JobError", "JobResult", "JobRuntime", "RoundRecord", "driver_threads", "ensure_ray", "format_summary", "run_job", "sample_clients"]


_INLINE_BROADCAST_BYTES = 64 << 10  # below Ray's 100 KiB limit for arguments passed inline


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
    epsilon: float | None = None  # differential privacy spent so far (with privacy.delta)
    client_flops: int = 0  # mean analytic training FLOPs per client
    param_memory_bytes: int = 0  # largest parameter memory a client held while training
    keep_rate: float = 1.0  # mean Federated Dropout keep rate
    p2u_stages: list | None = None  # P2U: accuracy after each stage against cumulative bytes
    virtual_s: float | None = None  # population model: the round's duration in virtual time
    sparsity: float = 0.0  # pruning: the fraction of weight-matrix entries pruned this round
    client_eval_accuracy: float | None = None  # client-side evaluation, weighted by examples
    client_eval_loss: float | None = None
    missing_real_clients: int = 0  # real clients (service.real_clients) whose update did not arrive
    metrics: dict = field(default_factory=dict)  # every metric the task's evaluate returned (test data;
    # "client_"-prefixed: client-side evaluation weighted by examples; "train_loss")


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

    @property
    def final_metrics(self) -> dict:
        """The last round's evaluation metrics (whatever the task's evaluate returns)."""
        return dict(self.rounds[-1].metrics) if self.rounds else {}

    def totals(self) -> dict[str, int]:
        keys = ("bytes_up", "bytes_down", "bytes_up_fp32", "bytes_down_fp32")
        return {k: sum(getattr(r, k) for r in self.rounds) for k in keys}

    def summary(self) -> dict:
        """The JSON summary (the CLI's --json contract)."""
        t = self.totals()
        return {
            "job_id": self.job_id,
            "final_accuracy": self.final_accuracy,
            "final_metrics": self.final_metrics,
            "wall_s": self.wall_s,
            "bytes_up_total": t["bytes_up"],
            "bytes_down_total": t["bytes_down"],
            "bytes_up_fp32": t["bytes_up_fp32"],
            "bytes_down_fp32": t["bytes_down_fp32"],
            "codec": self.spec.compression.codec,
            "broadcast": self.spec.compression.broadcast,
            "failed_clients_total": sum(r.failed for r in self.rounds),
            "missing_real_clients_total": sum(r.missing_real_clients for r in self.rounds),
            "rounds": [asdict(r) for r in self.rounds],
            "spec": self.spec.to_dict(),
        }

    def write_json(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.summary(), indent=2))


def sample_clients(num_clients: int, k: int, seed: int, round: int) -> np.ndarray:
    """The clients of one round: k distinct ids, from (seed, round) alone.

    O(k) whatever num_clients (numpy's `choice` without replacement runs Floyd's algorithm with
    a hash set when k is under 2% of the population; below 500,000 clients it may shuffle them
    all): a billion-client population samples as fast as a thousand-client one."""
    rng = np.random.default_rng([seed, round, 0x5A3])
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def driver_threads(free_cpus: float) -> int:
    """The driver's torch threads while a job runs (evaluation, the strategy's step): the CPUs that
    the job's worker actors leave free, at least one and at most torch's default.

    Where the workers hold every CPU (a local Ray: one worker per CPU), more threads only fight
    them: on 2 busy cores the digits test set took 8-20 ms to evaluate with 2 threads, 0.13 ms
    with one (docs/performance.md)."""
    return max(1, min(torch.get_num_threads(), int(free_cpus)))


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
    # An embedded Ray lives on 127.0.0.1 for this process only: its token-auth notice is not
    # something the user can act on, and it would be the first line they see.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, logging_level="WARNING",
        object_store_memory=512 << 20, configure_logging=True,
    )
    return True


def _job_secret(spec: JobSpec) -> str:
    return os.environ.get(spec.service.secret_env) or secrets.token_hex(16)


def _tls(spec: JobSpec) -> TLSConfig | None:
    sv = spec.service
    return TLSConfig(sv.tls_cert, sv.tls_key, sv.tls_client_ca) if sv.tls_cert else None


# Spec sections that stay with the driver: real clients are told the rest (a tracking URI may hold
# credentials; checkpoints live where the driver runs).
_DRIVER_ONLY = ("tracking", "checkpoint_dir")


class _Shards:
    """The job's aggregation shards: start and restart them (bounded by
    `resources.shard_start_timeout_s`, with an error naming what no node offers), open and close rounds.

    Each shard binds `service.host` (unset: all interfaces) and advertises its Ray node's IP to
    the workers; real clients get `service.public_address` from GetJob when it is set. With a
    fixed `service.port` and a `shard_resource`, a shard takes a whole unit of the resource: one
    shard per aggregation node, every one on the same port (the port a Kubernetes Service targets).
    """

    def __init__(self, spec: JobSpec, job_id: str, secret: str, shapes: dict, layout,
                 max_weight: float | None = None, log: Callable[[str], None] = print) -> None:
        self._spec, self._job_id, self._log = spec, job_id, log
        self._kw = dict(
            job_id=job_id, secret=secret, shapes=shapes, host=spec.service.host, tls=_tls(spec),
            limits=spec.service,  # a ServiceSpec is the shards' ServiceLimits
            spec_json=json.dumps({k: v for k, v in spec.to_dict().items() if k not in _DRIVER_ONLY}),  # real clients read it back as a typed JobSpec
            num_rounds=spec.training.rounds, strategy=spec.strategy, privacy=spec.privacy,
            max_clients=spec.training.clients_per_round + spec.service.real_clients,
            codecs={spec.compression.codec: dict(spec.compression.codec_params)}, dropout=spec.dropout,
            layout=layout, seed=spec.seed, max_weight=max_weight, worker_reduce=spec.resources.worker_reduce,
        )
        n = spec.resources.shards
        self.actors: list = [None] * n
        self._starts = [0] * n
        self.addresses: list[str] = [""] * n
        self.restarts = 0
        deadline = time.monotonic() + spec.resources.shard_start_timeout_s
        for i in range(n):
            self.actors[i], self.addresses[i] = self._bring_up(i, deadline)
        self._publish()

    def _resource_amount(self) -> float:
        return 1.0 if self._spec.service.port else 0.001

    def _port(self, i: int) -> int:
        """A fixed port is every shard's with a shard resource (each holds a node of its own),
        else shard i's is port + i (they share one node)."""
        port = self._spec.service.port
        return port if not port or self._spec.resources.shard_resource else port + i

    def _start(self, i: int):
        res = self._spec.resources
        # `{job}:aggregator-{i}`; a start again (a dead one, a restart) gets `-{n}`: Ray frees a
        # killed actor's name only once it is dead.
        self._starts[i] += 1
        n = self._starts[i]
        opts: dict = {"name": f"{self._job_id}:aggregator-{i}" + (f"-{n - 1}" if n > 1 else "")}
        if res.shard_resource:
            opts["resources"] = {res.shard_resource: self._resource_amount()}
        return AggregationShard.options(**opts).remote(port=self._port(i), shard=(i, res.shards), **self._kw)

    def _bring_up(self, i: int, deadline: float) -> tuple[object, str]:
        """Start shard i and wait until it serves; retry a start that died (its node was dying)
        until `deadline`. Raises JobError on a timeout or a shard whose own start fails twice."""
        creation_errors, last = 0, None
        while True:
            actor = self._start(i)
            ref = actor.address.remote()
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                _kill(actor)
                timeout = self._spec.resources.shard_start_timeout_s
                raise JobError(f"aggregation shard {i} did not start within resources.shard_start_timeout_s="
                               f"{timeout:g}s: {self._why_not_placed()}" + (f" (last error: {last})" if last else ""))
            try:
                return actor, ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                last = _first_line(e)
                _kill(actor)
                # An error raised in the shard's own __init__ (bind, TLS files) repeats; a start
                # cancelled with its dying node is placed elsewhere on the next try.
                creation_errors += "creation task" in str(e)
                if creation_errors >= 2:
                    raise JobError(f"aggregation shard {i} failed to start: {last}") from None
                self._log(f"aggregation shard {i} did not start ({last}); starting it again")
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _why_not_placed(self) -> str:
        res = self._spec.resources.shard_resource
        if not res:
            return "Ray could not place it (check `ray status` for pending demands)"
        need = self._resource_amount()
        offering = [n["NodeManagerAddress"] for n in ray.nodes()
                    if n.get("Alive") and n.get("Resources", {}).get(res, 0) >= need]
        if not offering:
            return (f"no live node offers the Ray resource {res!r} (resources.shard_resource or "
                    f"FEDRAY_AGGREGATOR_RESOURCE; the Helm chart's aggregation group gives it: is that group up?)")
        return (f"the nodes offering {res!r} ({', '.join(offering)}) have no {need:g} of it free "
                "(one shard per node when service.port is fixed)")

    def public_addresses(self) -> tuple[str, ...]:
        """What GetJob tells real clients: the public address if set; nothing with one shard (a
        client stays on the address it dialled); else every shard's advertised address."""
        sv = self._spec.service
        if sv.public_address:
            return (sv.public_address,)
        return () if len(self.actors) == 1 else tuple(self.addresses)

    def _publish(self) -> None:
        pub = self.public_addresses()
        for a in self.actors:
            _succeeded(a.set_addresses.remote(pub))

    def restart(self, i: int) -> None:
        """Replace shard i (on any node that offers the resource). Raises JobError when it cannot."""
        _kill(self.actors[i])
        deadline = time.monotonic() + self._spec.resources.shard_start_timeout_s
        self.actors[i], self.addresses[i] = self._bring_up(i, deadline)
        self._publish()
        self.restarts += 1
        self._log(f"aggregation shard {i} restarted at {self.addresses[i]}")

    def committed(self, r: int) -> int:
        return sum(ray.get([a.committed.remote(r) for a in self.actors]))

    def stop(self) -> None:
        for a in self.actors:
            try:
                ray.get(a.finish.remote(), timeout=10)
                ray.get(a.stop.remote(), timeout=10)
            except Exception:  # a dead shard needs no stopping
                pass
            _kill(a)


def _kill(actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # already gone
        pass


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    tail = [ln for ln in lines if "Error:" in ln and not ln.startswith("ray.exceptions")]
    return (tail[-1] if tail else lines[0] if lines else type(e).__name__)[:400]


def run_job(
    spec: JobSpec, *, progress: bool = True, log: Callable[[str], None] = print,
    on_round: Callable[[RoundRecord], None] | None = None, resume: bool = False,
    on_start: Callable[["JobRuntime"], None] | None = None, task=None, base_dir: str | None = None,
) -> JobResult:
    """Run `spec` on the connected Ray cluster (see `ensure_ray`) and return its result.

    `task` (a `fedray.Task`) overrides the spec's `task:` section; otherwise the spec's task is
    resolved, with `base_dir` (the spec file's folder) first on the import path.
    With `resume`, continue from the last checkpoint in `spec.checkpoint_dir` (if any).

    Raises:
        SpecError: a codec name or its parameters are unknown (`JobSpec.check_plugins`).
        DatasetMissingError: the data set is not on this machine.
        JobError: a round ended with fewer than `training.min_clients` updates.
        TrackingError: a `tracking:` backend cannot be opened (before the first round).
    """
    spec.check_plugins()
    if not ray.is_initialized():
        raise JobError("Ray is not initialized: call fedray.orchestrator.engine.ensure_ray() first")
    rt = JobRuntime(spec, progress=progress, log=log, task=task, base_dir=base_dir)
    if on_start:
        on_start(rt)
    if spec.tracking is None:
        return rt.run(on_round=on_round, resume=resume)
    from .tracking import Tracker

    with Tracker(spec, job_id=rt.job_id, log=log) as tracker:
        return rt.run(on_round=tracker.chain(on_round), resume=resume)


class JobRuntime:
    """One job's driver state: data, model, shards, worker pool, strategy, state machine."""

    def __init__(self, spec: JobSpec, *, progress: bool, log: Callable[[str], None], task=None,
                 base_dir: str | None = None) -> None:
        from fedray.api import prepare_task

        spec, filled = apply_cluster_env(spec)  # the Helm chart's variables fill what the spec leaves unset
        self.spec, self.progress, self.log = spec, progress, log
        if filled:
            log("from the environment: " + ", ".join(f"{k}={v}" for k, v in filled))
        self.state = JobStateMachine()
        self.job_id = spec.service.job_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
        self.secret = _job_secret(spec)
        self.task = prepare_task(spec, task, base_dir=base_dir)
        self.num_clients = int(self.task.num_clients())
        self.test = self.task.test_data()
        self.population = None
        if spec.population is not None:
            self.population = Population(self.num_clients, spec.seed, profile=spec.population, examples=self._sizes())
        self._bytes_up_estimate = 0.0
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.model = self.task.model()
        self.params = get_params(self.model)
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.layout = self.task.fd_layout()
        self.omc_cfg = spec.omc
        self.quantized = quantizable_names(self.model) if spec.omc is not None else []
        self.fp32_bytes = 4 * num_params(self.params)
        comp = spec.compression
        self.strategy = spec.strategy.build()
        self.accountant = None
        self.noise_secret = b""  # DP: the driver's secret noise seed (privacy.noise_secret); never sent
        if spec.privacy is not None:
            self.noise_secret = noise_secret(spec.privacy)
            rate = min(1.0, (spec.training.clients_per_round + spec.service.real_clients) / self.num_clients)
            self.accountant = spec.privacy.accountant(sample_rate=rate)
        self.metrics = JobMetrics(spec.name, comp.codec)
        self.store = open_store(spec.checkpoint_dir) if spec.checkpoint_dir else None
        self.shards: _Shards | None = None
        self.pool: RayPool | None = None
        self._sent: _Sent | None = None  # the next round, sent out before this one's evaluation
        self._wall_end = 0.0  # when the last round's wall ended

    def _start(self) -> None:
        spec, tr, comp, res = self.spec, self.spec.training, self.spec.compression, self.spec.resources
        cap = None
        if spec.strategy.max_weight_share is not None:  # the mean client size prices the cap
            cap = spec.strategy.weight_cap(clients_per_round=tr.clients_per_round + spec.service.real_clients,
                                           mean_examples=float(np.mean(self._sizes(all_ids=True))))
        self.shards = _Shards(spec, self.job_id, self.secret, self.shapes, self.layout, max_weight=cap, log=self.log)
        setup = TrainerSetup.from_spec(spec, job_id=self.job_id, secret=self.secret)
        workers = res.num_workers or default_num_workers()
        # Two calls per worker keep a worker busy while the driver handles a result; with partial
        # sums one call per worker and round: each call costs a worker ~3 ms of CPU (Ray's call,
        # the upload) whatever its size, and its results are small (docs/performance.md).
        calls = workers if res.worker_reduce else 2 * workers
        per_call = res.clients_per_call or min(256, max(1, math.ceil(tr.clients_per_round / calls)))
        cpus = res.cpus_per_worker
        if cpus is None:  # more workers than CPUs share them (uploads leave a worker idle part of a call)
            cpus = min(1.0, ray.cluster_resources().get("CPU", 1) / workers)
        self.pool = RayPool(
            setup, self.task, num_workers=workers, clients_per_call=per_call, num_cpus=cpus,
            num_gpus=res.gpus_per_worker, job_name=self.job_id, max_attempts=res.max_attempts,
        )
        self.metrics.wait_ready()
        self._driver_threads = driver_threads(ray.cluster_resources().get("CPU", 0) - workers * cpus)

    def run(self, *, on_round=None, resume: bool = False) -> JobResult:
        spec, tr = self.spec, self.spec.training
        t_job = time.perf_counter()
        result = JobResult(self.job_id, spec)
        first = 1
        if resume and self.store is not None and (ck := self.store.load_latest()) is not None:
            self._restore(ck, result)
            first = ck["round"] + 1
            self.log(f"resuming {spec.name} after round {ck['round']} from {spec.checkpoint_dir}")
        self.state.to(JobState.RUNNING)
        threads = torch.get_num_threads()
        try:
            self._start()
            torch.set_num_threads(self._driver_threads)
            self.log(f"fedray job {self.job_id}: {self.num_clients} clients on {self.task.describe()}, "
                     f"{tr.clients_per_round} per round, {tr.rounds} rounds, codec {spec.compression.codec}, "
                     f"aggregation service at {', '.join(self.shards.addresses)}"
                     f"{' (TLS)' if spec.service.tls_cert else ''}")
            for r in range(first, tr.rounds + 1):
                rec = self._round(r)
                result.rounds.append(rec)
                if self.store is not None:
                    self.store.save(r, self._checkpoint(r, result))
                if on_round:
                    on_round(rec)
        except BaseException as e:
            self.state.to(JobState.STOPPED if isinstance(e, KeyboardInterrupt) else JobState.FAILED, str(e))
            raise
        finally:
            torch.set_num_threads(threads)
            self.metrics.flush()
            if self.pool is not None:
                self.pool.shutdown()
            if self.shards is not None:
                self.shards.stop()
        self.state.to(JobState.SUCCEEDED)
        result.params = self.params
        result.wall_s = time.perf_counter() - t_job + result.wall_s
        return result

    def _checkpoint(self, r: int, result: JobResult) -> dict:
        return {
            "round": r, "params": self.params, "strategy": self.strategy.state_dict(),
            "accountant": self.accountant.state_dict() if self.accountant else None,
            "rounds": [asdict(x) for x in result.rounds], "wall_s": time.perf_counter(), "spec": self.spec.to_dict(),
            # what the next round depends on besides (seed, round): the stragglers model's upload
            # size estimate and the DP noise secret (the checkpoint stays on the driver's side)
            "bytes_up_estimate": self._bytes_up_estimate, "noise_secret": self.noise_secret.hex(),
        }

    def _restore(self, ck: dict, result: JobResult) -> None:
        if {**ck["spec"], "tracking": None} != {**self.spec.to_dict(), "tracking": None}:  # tracking may change
            raise JobError(f"checkpoint in {self.spec.checkpoint_dir} is of another job spec; use a new checkpoint_dir")
        self.params = {k: v.clone() for k, v in ck["params"].items()}
        set_params(self.model, self.params)
        self.strategy.load_state_dict(ck["strategy"])
        if self.accountant is not None:
            self.accountant.load_state_dict(ck["accountant"])
        self._bytes_up_estimate = float(ck.get("bytes_up_estimate", 0.0))
        if ck.get("noise_secret"):
            self.noise_secret = bytes.fromhex(ck["noise_secret"])
        result.rounds = [RoundRecord(**x) for x in ck["rounds"]]

    def _pipelines(self) -> bool:
        """Whether round r+1 is sent out before round r's evaluation and record: not where a
        round's start reads what its predecessor's end writes after the step (pruning changes
        the global model that round r's checkpoint saves; the population prices uploads at the
        last round's size), nor with real clients (their round is closed after a wait)."""
        sp = self.spec
        return (sp.pruning is None and sp.population is None and not sp.service.real_clients
                and hasattr(self.pool, "submit_round"))

    def _dispatch(self, r: int) -> "_Sent":
        """Round r's start: prune, broadcast, sample, and send the workers' calls, then the
        shards' open and early close."""
        spec, tr = self.spec, self.spec.training
        comp = spec.compression
        sparse, sparsity = self._prune(r)
        bcast = make_broadcast(self.params, codec=comp.broadcast, codec_params=comp.broadcast_params, round=r,
                               omc_cfg=self.omc_cfg, quantized=self.quantized, sparse=sparse)
        down_per_client = bcast.bytes_used()
        virtual_s = None
        if self.population is not None:
            pop = spec.population
            sample = self.population.sample_round(
                r, tr.clients_per_round, over_select=pop.over_select, deadline_s=pop.deadline_s,
                bytes_up=self._bytes_up_estimate or self.fp32_bytes, bytes_down=down_per_client,
                epochs=tr.local_epochs,
            )
            ids, virtual_s = np.sort(sample.train_ids), sample.virtual_s
        else:
            ids = sample_clients(self.num_clients, tr.clients_per_round, spec.seed, r)
        down_sampled = down_per_client * len(ids) if spec.dropout is None else subnet_bytes_down(
            self.params, self.layout, spec.dropout, job_seed=spec.seed, round=r, client_ids=ids,
            encoded_bytes=lambda sub: make_broadcast(  # each client downloads only its sub-model
                sub, codec=comp.broadcast, codec_params=comp.broadcast_params, round=r, omc_cfg=self.omc_cfg,
                quantized=self.quantized, sparse=sparse).bytes_used())
        # once per round; every worker and every shard read this one copy. A small model travels
        # inside the calls instead: a put and each reader's fetch cost more than ~3 copies of it.
        bref = PickledOnce(bcast) if bcast.bytes_used() <= _INLINE_BROADCAST_BYTES else ray.put(bcast)
        # The workers' calls go first (each Ray submission costs the driver ~0.3-0.5 ms), then the
        # shards' open and early close; the workers start without waiting for the shards' answers
        # to the open: a shard holds an upload for the round it is about to open until the open
        # lands (AggregationCore.upload).
        sent = _Sent(r, ids, bcast, bref, down_per_client, down_sampled, virtual_s, sparsity)

        def to_shards() -> None:
            sent.opening = [a.open_round.remote(r, bref) for a in self.shards.actors]
            sent.closing = self._close_early(r, ids)

        sent.inflight = self.pool.submit_round(r, bref, ids, self.shards.addresses, on_dispatch=to_shards)
        return sent

    def _round(self, r: int) -> RoundRecord:
        spec, tr = self.spec, self.spec.training
        sent, self._sent = self._sent, None
        if sent is not None and sent.round == r:  # sent out during round r-1: its wall starts where r-1's ended
            t0 = self._wall_end
        else:
            t0 = time.perf_counter()
            sent = self._dispatch(r)
        ids, bcast, bref, opening, closing = sent.ids, sent.bcast, sent.bref, sent.opening, sent.closing
        down_per_client, down_sampled, virtual_s, sparsity = (sent.down_per_client, sent.down_sampled,
                                                              sent.virtual_s, sent.sparsity)
        bar = tqdm(total=len(ids), desc=f"round {r}/{tr.rounds}", unit="client", disable=not self.progress, leave=True)
        try:
            results = {x.client_id: x for x in self.pool.collect_round(sent.inflight, on_batch=lambda b: bar.update(len(b)))}
            self._settle_open(r, bref, opening, ids, results)
            self._wait_real_clients(r, sum(x.error is None for x in results.values()))
            agg, decode_s, count = self._close(r, bref, ids, results, closing)
        finally:
            bar.close()
        ok = [x for x in results.values() if x.error is None]
        failed = [x for x in results.values() if x.error is not None]
        real = max(count - len(ok), 0)
        missing = self._check_outcome(r, len(ids), failed, real, count)
        delta = agg.mean_delta() if isinstance(agg, CountedSum) else self.strategy.reduce(agg)
        epsilon = None
        if spec.privacy is not None:
            delta = add_gaussian_noise(
                delta, noise_multiplier=spec.privacy.noise_multiplier, clip_norm=spec.privacy.clip_norm,
                num_clients=tr.clients_per_round + spec.service.real_clients, generator=noise_generator(self.noise_secret, r),
            )
            self.accountant.step()
            epsilon = self.accountant.epsilon(spec.privacy.delta)
        self.params = self.strategy.step(self.params, delta)
        del agg, delta  # the round's mean (1x fp32) is not needed past the step
        stages = self._p2u_curve(bcast) if len(bcast.stages) > 1 else None
        set_params(self.model, self.params)
        if r < tr.rounds and self._pipelines() and bcast.bytes_used() <= _INLINE_BROADCAST_BYTES:
            # the next round trains while this one is evaluated and recorded: its inputs (the
            # stepped global model, its seeded sample) are fixed now; results are the same. Only
            # for a model small enough to travel inside the calls: there a round is milliseconds
            # of fixed costs, while a large model's round is its training, and overlapping two
            # rounds would hold two broadcasts in the object store
            self._sent = self._dispatch(r + 1)
        metrics = self._evaluate()
        train_loss = float(np.mean([x.loss for x in ok])) if ok else float("nan")
        if not metrics and ok:  # no test data: the clients' own view of the round
            metrics = {"train_loss": train_loss}
        acc, loss = float(metrics.get("accuracy", math.nan)), float(metrics.get("loss", math.nan))
        client_eval = _client_eval(ok)
        metrics.update({f"client_{k}": v for k, v in client_eval.pop("_all", {}).items()})
        self._wall_end = time.perf_counter()
        wall = self._wall_end - t0
        rec = RoundRecord(
            round=r, clients=count, failed=len(failed), missing_real_clients=missing, accuracy=acc, loss=loss,
            bytes_up=sum(x.bytes_up for x in ok), bytes_down=down_sampled + down_per_client * real,
            bytes_up_fp32=self.fp32_bytes * len(ok), bytes_down_fp32=self.fp32_bytes * (len(ids) + real), wall_s=wall,
            train_loss=train_loss, epsilon=epsilon,
            client_flops=int(np.mean([x.flops for x in ok])) if ok else 0,
            param_memory_bytes=max((x.param_memory_bytes for x in ok), default=0),
            keep_rate=float(np.mean([x.keep_rate for x in ok])) if ok else 1.0, p2u_stages=stages,
            virtual_s=virtual_s, sparsity=sparsity, metrics=metrics, **client_eval,
        )
        if ok:  # the stragglers model prices the next round's uploads at this round's real size
            self._bytes_up_estimate = rec.bytes_up / len(ok)
        self.metrics.record_round(
            round=r, ok=len(ok), failed=len(failed), bytes_up=rec.bytes_up, bytes_down=rec.bytes_down,
            fp32_up=rec.bytes_up_fp32, accuracy=acc, wall_s=wall, decode_s=decode_s,
            broadcast_codec=spec.compression.broadcast, metrics=metrics,
        )
        self.log(f"round {r}/{tr.rounds}: accuracy {acc:.4f}, clients {rec.clients}, failed {rec.failed}, "
                 f"up {_mb(rec.bytes_up)}, down {_mb(rec.bytes_down)}, {wall:.2f}s") if not self.progress else None
        return rec

    def _sizes(self, *, all_ids: bool = False):
        """Examples per client from the task: an array, or a function of client ids (a seeded
        population stores nothing per client); `all_ids` evaluates such a function on every id."""
        sizes = self.task.client_sizes()
        if callable(sizes):
            return sizes(np.arange(self.num_clients, dtype=np.int64)) if all_ids else sizes
        return np.asarray(sizes)

    def _evaluate(self) -> dict[str, float]:
        """The task's metrics of the global model (in `self.model`) on its test data."""
        if self.test is None:
            return {}
        out = self.task.evaluate(self.model, self.test)
        return {str(k): float(v) for k, v in dict(out).items()}

    def _prune(self, r: int) -> tuple[dict | None, float]:
        """Prune the global model to this round's sparsity (cubic schedule); the fractions kept."""
        pr = self.spec.pruning
        if pr is None:
            return None, 0.0
        s = cubic_sparsity(r, start=pr.start_round, end=pr.end_round, target=pr.target)
        if s <= 0:
            return None, 0.0
        mask = magnitude_mask(self.params, s)
        self.params = {k: v.clone() for k, v in self.params.items()}
        apply_mask(self.params, mask)
        return {k: float(m.float().mean()) for k, m in mask.items()}, s

    def _p2u_curve(self, b) -> list[dict]:
        """Accuracy of the round's broadcast after each P2U stage, against cumulative bytes."""
        out, cum = [], 0
        for k, nbytes in enumerate(b.stage_bytes()):
            cum += nbytes
            acc = math.nan
            if self.test is not None:  # without test data there is nothing to measure: no decode (1x fp32 each)
                set_params(self.model, decode_broadcast(b, k + 1))
                acc = self._evaluate().get("accuracy", math.nan)
            out.append({"stage": k, "cumulative_bytes": cum, "accuracy": acc})
        return out

    def _settle_open(self, r: int, bref, opening: list, ids, results: dict) -> None:
        """Check that every shard opened round r; one that was down is restarted, opened, and its
        clients (whose uploads it could not take) are trained again."""
        for i, ref in enumerate(opening):
            if not _succeeded(ref):
                self._recover_shard(r, bref, ids, results, i, "is down")

    def _recover_shard(self, r: int, bref, ids, results: dict, i: int, why: str) -> None:
        """Restart shard i (on any node offering the resource), open round r there and train its
        clients again: nothing of theirs was committed anywhere else. Raises JobError."""
        n = len(self.shards.actors)
        for attempt in range(self.spec.resources.max_attempts):
            self.log(f"round {r}: aggregation shard {i} {why}; restarting it and retraining its clients")
            try:
                self.shards.restart(i)
            except JobError as e:
                raise JobError(f"round {r}: {e}") from None
            if not _succeeded(self.shards.actors[i].open_round.remote(r, bref)):
                why = "died again"
                continue
            mine = [c for c in ids if serde.shard_index(int(c), n) == i]
            for x in self.pool.run_round(r, bref, mine, self.shards.addresses):
                results[x.client_id] = x
            return
        raise JobError(f"round {r}: aggregation shard {i} failed {self.spec.resources.max_attempts} times "
                       "(resources.max_attempts)")

    def _wait_real_clients(self, r: int, simulated_ok: int) -> None:
        want = self.spec.service.real_clients
        if not want:
            return
        deadline = time.monotonic() + self.spec.service.real_client_wait_s
        while self.shards.committed(r) < simulated_ok + want and time.monotonic() < deadline:
            time.sleep(0.05)

    def _close_early(self, r: int, ids) -> dict[int, tuple]:
        """Send each shard its close with the number of updates it should get (its sampled
        clients), right after the dispatch: a shard closes when the last of them is committed, so
        its sum comes back with the workers' results instead of a round trip after them
        (`AggregationCore.close_round`). {shard: (actor, ref)}; none with real clients (their
        number is not known in advance: the driver waits for them, then closes)."""
        if self.spec.service.real_clients:
            return {}
        n = len(self.shards.actors)
        expect = [len(ids)] if n == 1 else [0] * n
        for c in ids if n > 1 else ():  # one shard gets every client: no hashing
            expect[serde.shard_index(int(c), n)] += 1
        return {i: (a, a.close_round.remote(r, expect[i]), expect[i]) for i, a in enumerate(self.shards.actors)}

    def _close(self, r: int, bref, ids, results: dict, closing: dict | None = None) -> tuple[object, float, int]:
        """Close the round on every shard and merge their partial sums; a shard that died is
        restarted and its clients trained again (nothing was committed anywhere else). Running
        sums stay on the shards and come over as float32 pieces of the mean (`_stream_mean`).
        A shard whose early close (`_close_early`) can still answer is not asked again."""
        n, ok = len(self.shards.actors), [0] * len(self.shards.actors)
        for x in results.values():
            if x.error is None:
                ok[serde.shard_index(x.client_id, n)] += 1
        parts = [self._early_part(closing.get(i) if closing else None, i, ok[i])
                 or self._close_shard(r, bref, ids, results, i) for i in range(n)]
        if all(p.get("streamed") for p in parts):
            agg = self._stream_mean(r, bref, ids, results, parts)
        else:
            agg = parts[0]["agg"]
            for p in parts[1:]:
                agg.merge(p["agg"])
        return agg, sum(p["decode_s"] for p in parts), sum(p["count"] for p in parts)

    def _early_part(self, early: tuple | None, i: int, ok: int) -> dict | None:
        """Shard i's answer to its early close, or None when the driver must close it itself:
        the shard was restarted since, fewer of its clients succeeded than it waits for (the
        plain close then ends that wait), or the early close gave up."""
        if early is None or early[0] is not self.shards.actors[i] or ok < early[2]:
            return None
        try:
            return ray.get(early[1])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayTaskError):
            return None  # the plain close restarts a dead shard, or reports what went wrong

    def _close_shard(self, r: int, bref, ids, results: dict, i: int) -> dict:
        for _ in range(self.spec.resources.max_attempts):
            try:
                return ray.get(self.shards.actors[i].close_round.remote(r))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self._recover_shard(r, bref, ids, results, i, "died")
        raise JobError(f"round {r}: aggregation shard {i} failed {self.spec.resources.max_attempts} times")

    def _stream_mean(self, r: int, bref, ids, results: dict, parts: list) -> StreamedMean:
        """The round's weighted mean from the shards' closed running sums, received as float32
        pieces into one buffer per tensor (orchestrator/sum_stream.py): the driver holds 1x the
        fp32 model of it, and no copy of a sum passes through the object store. A shard that dies
        mid-stream is restarted, its clients trained again, and the whole stream taken again."""
        for _ in range(self.spec.resources.max_attempts):
            total = sum(p["total_weight"] for p in parts if p["sum_count"])
            count = sum(p["sum_count"] for p in parts)
            shapes = next((p["shapes"] for p in parts if p["sum_count"]), {})
            out = {k: torch.empty(s, dtype=torch.float32) for k, s in shapes.items()}
            numel, first, i = sum(v.numel() for v in out.values()), True, 0
            try:
                for i, p in enumerate(parts):
                    if not p["sum_count"]:
                        continue  # an empty sum adds nothing
                    gen = self.shards.actors[i].stream_sum.options(
                        num_returns="streaming", _generator_backpressure_num_objects=256).remote(r, total)
                    got = receive((ray.get(ref) for ref in gen), out, add=not first)
                    if got != numel:
                        raise JobError(f"round {r}: aggregation shard {i} sent {got} of {numel} sum elements")
                    first = False
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self._recover_shard(r, bref, ids, results, i, "died")
                parts[i] = self._close_shard(r, bref, ids, results, i)
        else:
            raise JobError(f"round {r}: aggregation shard {i} failed {self.spec.resources.max_attempts} times")
        for a in self.shards.actors:
            a.release_round.remote(r)  # not awaited: the next open frees it too
        return StreamedMean(out, total, count)

    def _check_outcome(self, r: int, sampled: int, failed: list, real: int, count: int) -> int:
        """Log the round's failed clients and missing real clients; raise JobError when the round
        is past `training.min_clients` or `training.max_failed_fraction`. Returns the missing count."""
        tr, sv = self.spec.training, self.spec.service
        missing = max(sv.real_clients - real, 0)
        if failed:
            self.log(f"round {r}: {len(failed)} of {sampled} simulated clients failed")
            for x in failed[:3]:
                self.log(f"round {r}: {x.error}")
        if missing:
            self.log(f"round {r}: {missing} of {sv.real_clients} real clients missing after "
                     f"service.real_client_wait_s={sv.real_client_wait_s:g}s")
        expected, bad = sampled + sv.real_clients, len(failed) + missing
        first = failed[0].error if failed else "none"
        cause = self._unreachable_hint(failed)
        if count < tr.min_clients:
            raise JobError(f"round {r}: {count} updates arrived, fewer than training.min_clients={tr.min_clients}"
                           f" ({len(failed)} clients failed, {missing} real clients missing; first error: {first}){cause}")
        if bad and bad >= tr.max_failed_fraction * expected:
            raise JobError(f"round {r}: {bad} of {expected} clients failed or were missing, at least "
                           f"training.max_failed_fraction={tr.max_failed_fraction:g} of them "
                           f"({len(failed)} failed, {missing} real clients missing; first error: {first}){cause}")
        return missing

    def _unreachable_hint(self, failed: list) -> str:
        errs = " ".join(str(x.error) for x in failed[:20])
        if not any(k in errs for k in ("UNAVAILABLE", "failed to connect", "Connection refused", "unreachable")):
            return ""
        sv = self.spec.service
        return (f". Workers could not reach the aggregation service at {', '.join(self.shards.addresses)}: "
                f"check service.host={sv.host!r} (unset: shards bind all interfaces and advertise their Ray node's "
                f"IP) and service.port={sv.port}, and that worker nodes can reach the aggregation nodes")


@dataclass
class _Sent:
    """A round sent out (`JobRuntime._dispatch`): what its collection and record need."""

    round: int
    ids: np.ndarray
    bcast: object
    bref: object
    down_per_client: int
    down_sampled: int
    virtual_s: object
    sparsity: float
    opening: list = field(default_factory=list)
    closing: dict = field(default_factory=dict)
    inflight: object = None


def _succeeded(ref) -> bool:
    """Whether an actor call returned (False: the actor was dead or died)."""
    try:
        ray.get(ref)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        return False


def _client_eval(ok) -> dict:
    """Client-side evaluation of the round's model, aggregated over clients by their examples."""
    rows = [(x.examples, dict(x.eval_metrics)) for x in ok if x.eval_metrics]
    if not rows:
        return {}
    m = aggregate_metrics(rows)
    return {"client_eval_accuracy": m.get("accuracy"), "client_eval_loss": m.get("loss"),
            "_all": {f"eval_{k}": v for k, v in m.items()}}


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
        "  round  clients  failed  accuracy  up        down      wall",
    ]
    for r in result.rounds:
        lost = f"{r.failed}" + (f"+{r.missing_real_clients}" if r.missing_real_clients else "")
        lines.append(f"  {r.round:5d}  {r.clients:7d}  {lost:>6}  {r.accuracy:8.4f}  {_mb(r.bytes_up):>8}  "
                     f"{_mb(r.bytes_down):>8}  {r.wall_s:5.2f}s")
    failed = sum(r.failed for r in result.rounds)
    missing = sum(r.missing_real_clients for r in result.rounds)
    if failed or missing:
        lines.append(f"  {failed} client updates failed and {missing} real-client updates were missing "
                     f"over {sum(1 for r in result.rounds if r.failed or r.missing_real_clients)} rounds")
    return "\n".join(lines)
