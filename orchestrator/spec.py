"""The typed job spec: nested dataclasses validated on construction, loadable from YAML.

Every error names the field by its dotted path and says what is allowed, e.g.
`SpecError: training.rounds: must be an integer >= 1, got 0`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .privacy import DPSpec
from .strategy import StrategySpec

__all__ = [
    "CompressionSpec",
    "DataSpec",
    "DPSpec",
    "DropoutSpec",
    "OMCSpec",
    "PopulationSpec",
    "PruningSpec",
    "JobSpec",
    "ModelSpec",
    "ResourceSpec",
    "ServiceSpec",
    "SpecError",
    "StrategySpec",
    "TaskSpec",
    "TrainingSpec",
]

from fedray.builtin_tasks import DATASETS, MODELS, PARTITIONS  # noqa: E402  (names, no torch)


class SpecError(ValueError):
    """A job spec field is invalid; the message starts with the field's dotted path."""


def _fail(path: str, msg: str, value: Any) -> None:
    raise SpecError(f"{path}: {msg}, got {value!r}")


def _int(path: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(path, "must be an integer", v)
    if lo is not None and v < lo:
        _fail(path, f"must be an integer >= {lo}", v)
    if hi is not None and v > hi:
        _fail(path, f"must be an integer <= {hi}", v)


def _num(path: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(path, "must be a number", v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        _fail(path, f"must be {'>' if lo_open else '>='} {lo}", v)
    if hi is not None and v > hi:
        _fail(path, f"must be <= {hi}", v)


def _choice(path: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        _fail(path, f"must be one of {', '.join(allowed)}", v)


@dataclass(frozen=True)
class DataSpec:
    """Which data set, how many clients, how it is split among them."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    num_clients: int = 1000
    partition: str = "iid"
    alpha: float = 0.5
    examples_per_client: int | None = None  # set: each client holds this many examples drawn from
    # a seed (memory O(clients) ints; for populations far larger than the data set)

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            _fail("data.data_dir", "must be a path string or null", self.data_dir)
        _int("data.num_clients", self.num_clients, 1)
        _choice("data.partition", self.partition, PARTITIONS)
        _num("data.alpha", self.alpha, 0, lo_open=True)
        if self.examples_per_client is not None:
            _int("data.examples_per_client", self.examples_per_client, 1)


@dataclass(frozen=True)
class ModelSpec:
    """The model every client trains."""

    kind: str = "mlp"
    hidden: tuple[int, ...] = (200,)

    def __post_init__(self) -> None:
        _choice("model.kind", self.kind, MODELS)
        if not isinstance(self.hidden, tuple):
            object.__setattr__(self, "hidden", tuple(self.hidden) if isinstance(self.hidden, list) else self.hidden)
        if not isinstance(self.hidden, tuple):
            _fail("model.hidden", "must be a list of layer widths", self.hidden)
        for i, h in enumerate(self.hidden):
            _int(f"model.hidden[{i}]", h, 1, 1 << 16)


@dataclass(frozen=True)
class TaskSpec:
    """The user's task: `target` is an import string ("mytask:MyTask"), a `fedray.tasks` entry
    point or a built-in task name; `params` go to its constructor. Without a target, the job
    runs the built-in task that `data:` and `model:` describe. The target is imported when the
    job runs and by `fedray validate`, not when the spec is parsed."""

    target: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target is not None and (not isinstance(self.target, str) or not self.target.strip()):
            _fail("task.target", "must be an import string like 'package.module:Class' or a task name", self.target)
        if not isinstance(self.params, Mapping):
            _fail("task.params", "must be a mapping of constructor arguments", self.params)
        if self.params and self.target is None:
            raise SpecError("task.params: set task.target too (params go to its constructor)")


@dataclass(frozen=True)
class TrainingSpec:
    """The round loop and local training."""

    rounds: int = 5
    clients_per_round: int = 100
    local_epochs: int = 5
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0
    min_clients: int = 1  # a round with fewer successful updates fails
    client_eval: bool = False  # clients also evaluate the received model on their own data

    def __post_init__(self) -> None:
        _int("training.min_clients", self.min_clients, 1)
        _int("training.rounds", self.rounds, 1)
        _int("training.clients_per_round", self.clients_per_round, 1)
        _int("training.local_epochs", self.local_epochs, 1)
        _int("training.batch_size", self.batch_size, 1)
        _num("training.lr", self.lr, 0, lo_open=True)
        _num("training.momentum", self.momentum, 0, 1)


@dataclass(frozen=True)
class CompressionSpec:
    """Codecs by registry name: `codec` for uploads, `broadcast` for the model sent down."""

    codec: str = "int8"
    codec_params: Mapping[str, Any] = field(default_factory=dict)
    broadcast: str = "identity"
    broadcast_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fedray.compression import available_codecs, get_codec

        known = tuple(available_codecs())
        for name in ("codec", "broadcast"):
            v = getattr(self, name)
            _choice(f"compression.{name}", v, known)
            params = getattr(self, f"{name}_params")
            if not isinstance(params, Mapping):
                _fail(f"compression.{name}_params", "must be a mapping", params)
            try:
                if name == "broadcast" and v == "p2u":  # stages streamed progressively (P2UConfig)
                    from fedray.workers.broadcast import p2u_config

                    p2u_config(params)
                else:
                    get_codec(v, **dict(params))
            except (ValueError, TypeError) as e:
                raise SpecError(f"compression.{name}_params: {e}") from None


@dataclass(frozen=True)
class DropoutSpec:
    """Federated Dropout: each client trains a smaller dense sub-model cut from the global one.

    `keep_rates` with one value: every client keeps that fraction of each hidden layer's units;
    several: each client draws one (`mode: fixed` once for the job, like a device tier; `drawn`
    anew each round), with probabilities `probs` (uniform when empty). Only a seed travels.
    """

    keep_rates: tuple[float, ...] = (0.75,)
    mode: str = "fixed"
    probs: tuple[float, ...] = ()
    policy: str = "random"  # random (per client and round), prefix (HeteroFL), rolling (FedRolex)

    def __post_init__(self) -> None:
        for i, r in enumerate(self.keep_rates):
            _num(f"dropout.keep_rates[{i}]", r, 0, 1, lo_open=True)
        if not self.keep_rates:
            _fail("dropout.keep_rates", "must list at least one rate in (0, 1]", self.keep_rates)
        _choice("dropout.mode", self.mode, ("fixed", "drawn"))
        _choice("dropout.policy", self.policy, ("random", "prefix", "rolling"))
        if self.probs and (len(self.probs) != len(self.keep_rates) or abs(sum(self.probs) - 1) > 1e-6):
            _fail("dropout.probs", f"must be {len(self.keep_rates)} probabilities summing to 1", self.probs)


@dataclass(frozen=True)
class OMCSpec:
    """Online model compression: clients hold parameters quantized, decompressed per operation."""

    bits: int = 8
    fmt: str = "int"  # or "float" (exp_bits exponent bits)
    exp_bits: int = 5
    per_variable: bool = True
    weights_only: bool = True
    partial_fp32_fraction: float = 0.0
    stochastic: bool = True

    def __post_init__(self) -> None:
        _int("omc.bits", self.bits, 2, 16)
        _choice("omc.fmt", self.fmt, ("int", "float"))
        _int("omc.exp_bits", self.exp_bits, 1, 8)
        _num("omc.partial_fp32_fraction", self.partial_fp32_fraction, 0, 1)
        for f in ("per_variable", "weights_only", "stochastic"):
            if not isinstance(getattr(self, f), bool):
                _fail(f"omc.{f}", "must be true or false", getattr(self, f))
        try:
            self.config()
        except ValueError as e:
            raise SpecError(f"omc: {e}") from None

    def config(self):
        from fedray.compression.omc import OMCConfig

        return OMCConfig(bits=self.bits, fmt=self.fmt, exp_bits=self.exp_bits, per_variable=self.per_variable,
                         weights_only=self.weights_only, partial_fp32_fraction=self.partial_fp32_fraction,
                         stochastic=self.stochastic)


@dataclass(frozen=True)
class PopulationSpec:
    """Device heterogeneity and stragglers in virtual time (FedScale's over-selection).

    Each client gets a compute speed and up/down bandwidths (lognormal, seeded; or a trace CSV);
    its virtual completion time is its compute plus the real encoded bytes over its bandwidth.
    A round over-selects ceil(K * over_select) online clients, keeps the first K finishers (and,
    with `deadline_s`, only those finishing by then) and never trains the rest.
    """

    over_select: float = 1.0
    deadline_s: float | None = None
    speed_median: float = 1.0
    speed_sigma: float = 0.5
    up_mbps_median: float = 10.0
    up_sigma: float = 0.8
    down_mbps_median: float = 40.0
    down_sigma: float = 0.8
    availability: float = 1.0
    seconds_per_example: float = 1e-3
    trace_file: str | None = None

    def __post_init__(self) -> None:
        _num("population.over_select", self.over_select, 1)
        if self.deadline_s is not None:
            _num("population.deadline_s", self.deadline_s, 0, lo_open=True)
        try:
            self.profile()
        except ValueError as e:
            raise SpecError(str(e).replace("DeviceProfileSpec.", "population.")) from None

    def profile(self):
        from .population import DeviceProfileSpec

        return DeviceProfileSpec(
            speed_median=self.speed_median, speed_sigma=self.speed_sigma, up_mbps_median=self.up_mbps_median,
            up_sigma=self.up_sigma, down_mbps_median=self.down_mbps_median, down_sigma=self.down_sigma,
            availability=self.availability, seconds_per_example=self.seconds_per_example, trace_file=self.trace_file,
        )


@dataclass(frozen=True)
class PruningSpec:
    """Gradual magnitude pruning of the global model (Zhu & Gupta's cubic schedule): sparsity
    grows from 0 at `start_round` to `target` at `end_round`; pruned weight matrices go down as
    sparse payloads and clients keep pruned weights at zero."""

    target: float = 0.8
    start_round: int = 1
    end_round: int = 10

    def __post_init__(self) -> None:
        _num("pruning.target", self.target, 0, 0.999)
        _int("pruning.start_round", self.start_round, 1)
        _int("pruning.end_round", self.end_round, self.start_round + 1)


@dataclass(frozen=True)
class ResourceSpec:
    """How the job uses the cluster."""

    num_workers: int = 0  # 0: one per CPU Ray reports
    clients_per_call: int = 0  # 0: about two calls per worker per round (fewer calls, batched training)
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared by num_workers, at most 1
    gpus_per_worker: float = 0.0
    num_cpus: int | None = None  # for an embedded local Ray only
    shards: int = 1  # aggregation shards (gRPC servers); clients map to shards by a hash of their id
    shard_resource: str | None = None  # Ray custom resource that pins shards (e.g. fedray_aggregator)
    max_attempts: int = 3  # per client and round, over worker failures
    batched: bool = True  # train same-shape clients of one call together (vmap / batched matmuls)
    device: str = "auto"  # auto: CUDA in workers Ray gives a GPU (gpus_per_worker > 0); cpu; cuda

    def __post_init__(self) -> None:
        _int("resources.shards", self.shards, 1, 256)
        _int("resources.max_attempts", self.max_attempts, 1, 100)
        _choice("resources.device", self.device, ("auto", "cpu", "cuda"))
        if self.device == "cuda" and not self.gpus_per_worker:
            raise SpecError("resources.device: cuda needs resources.gpus_per_worker > 0 (Ray assigns the GPUs)")
        if self.shard_resource is not None and (not isinstance(self.shard_resource, str) or not self.shard_resource):
            _fail("resources.shard_resource", "must be a Ray resource name or null", self.shard_resource)
        _int("resources.num_workers", self.num_workers, 0)
        _int("resources.clients_per_call", self.clients_per_call, 0)
        if self.cpus_per_worker is not None:
            _num("resources.cpus_per_worker", self.cpus_per_worker, 0)
        _num("resources.gpus_per_worker", self.gpus_per_worker, 0)
        if self.num_cpus is not None:
            _int("resources.num_cpus", self.num_cpus, 1)


@dataclass(frozen=True)
class ServiceSpec:
    """The aggregation service as real clients see it."""

    host: str = "127.0.0.1"
    port: int = 0  # first shard's port (shard i listens on port + i); 0 picks free ports
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS, clients need a certificate from this CA
    real_clients: int = 0  # updates from real clients (outside Ray) each round waits for
    real_client_wait_s: float = 60.0
    job_id: str | None = None  # fixed job id (real clients need it); default: name + random suffix
    secret_env: str = "FEDRAY_JOB_SECRET"  # environment variable holding the job secret, if set
    max_inflight: int = 64  # uploads in flight per shard before RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        _int("service.port", self.port, 0, 65535)
        _int("service.real_clients", self.real_clients, 0)
        _num("service.real_client_wait_s", self.real_client_wait_s, 0)
        _int("service.max_inflight", self.max_inflight, 1)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SpecError("service.tls_cert: set both tls_cert and tls_key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SpecError("service.tls_client_ca: mutual TLS needs tls_cert and tls_key too")


@dataclass(frozen=True)
class JobSpec:
    """Everything a fedray job can set. Build it in Python or load it with `from_yaml`."""

    name: str = "fedray-job"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    service: ServiceSpec = field(default_factory=ServiceSpec)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    privacy: DPSpec | None = None  # client-level differential privacy (clip + Gaussian noise)
    dropout: DropoutSpec | None = None  # Federated Dropout subnets
    omc: OMCSpec | None = None  # OMC compressed training (downloads and uploads in its stored form)
    population: PopulationSpec | None = None  # device profiles, over-selection, deadline (virtual time)
    pruning: PruningSpec | None = None  # server-side gradual magnitude pruning
    checkpoint_dir: str | None = None  # checkpoint after every round here; `fedray run --resume` continues
    task: TaskSpec | None = None  # the user's task (model, client data, training); None: data + model sections

    def __post_init__(self) -> None:
        if self.privacy is not None:
            self.privacy.check_strategy(self.strategy.name)
        if self.dropout is not None and self.strategy.needs_all_updates:
            raise SpecError(f"dropout: Federated Dropout averages per coordinate; strategy.name "
                            f"{self.strategy.name!r} needs whole updates (use fedavg, fedavgm, fedadam, ...)")
        if self.pruning is not None and (self.omc is not None or self.compression.broadcast == "p2u"):
            raise SpecError("pruning: the pruned model goes down as a sparse payload; it cannot be combined "
                            "with omc or broadcast: p2u")
        if self.omc is not None:
            if self.dropout is not None:
                raise SpecError("omc: OMC and Federated Dropout cannot be combined yet; set one of them")
            if self.training.momentum:
                raise SpecError("omc: OMC training is plain SGD; set training.momentum to 0")
            if self.strategy.proximal_mu:
                raise SpecError("omc: OMC training cannot use FedProx; set strategy.proximal_mu to 0")
        if self.training.min_clients > self.training.clients_per_round + self.service.real_clients:
            raise SpecError(
                f"training.min_clients: {self.training.min_clients} is more than the "
                f"{self.training.clients_per_round} clients per round (plus real clients)"
            )
        if not isinstance(self.name, str) or not self.name:
            _fail("name", "must be a non-empty string", self.name)
        _int("seed", self.seed, 0, (1 << 63) - 1)
        if not self.uses_task_target and self.training.clients_per_round > self.data.num_clients:
            raise SpecError(
                f"training.clients_per_round: {self.training.clients_per_round} is more than "
                f"data.num_clients={self.data.num_clients}; lower it or add clients"
            )

    @property
    def uses_task_target(self) -> bool:
        """Whether the job runs a task named by `task.target` (not the data/model sections)."""
        return self.task is not None and self.task.target is not None

    # -- conversion ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JobSpec":
        """Build from nested mappings; unknown keys are errors that name the key."""
        return _build(cls, d, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JobSpec":
        """Load a YAML job spec.

        Raises:
            SpecError: the file is missing, not YAML, or a field is invalid.
        """
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"job spec file {str(p)!r} does not exist")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"{p}: not valid YAML: {e}") from None
        return cls.from_dict(d or {})

    def to_dict(self) -> dict[str, Any]:
        def conv(v):
            if isinstance(v, tuple):
                return list(v)
            if isinstance(v, Mapping):
                return {k: conv(x) for k, x in v.items()}
            return v

        return conv(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _build(cls: type, d: Any, prefix: str):
    where = prefix.rstrip(".") or "job spec"
    if not isinstance(d, Mapping):
        raise SpecError(f"{where}: must be a mapping of fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise SpecError(f"{prefix}{unknown[0]}: unknown field; {where} has: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        inner = _optional_dataclass(t)
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{prefix}{k}.")
        elif inner is not None and v is not None:
            kwargs[k] = _build(inner, v, f"{prefix}{k}.")
        elif _is_tuple(t) and isinstance(v, list):
            kwargs[k] = tuple(v)
        elif t is float or t == (float | None):
            kwargs[k] = float(v) if isinstance(v, int) and not isinstance(v, bool) else v
        else:
            kwargs[k] = v
    return cls(**kwargs)


def _optional_dataclass(t: Any):
    """X for a hint `X | None` where X is a dataclass, else None."""
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _is_tuple(t: Any) -> bool:
    return typing.get_origin(t) is tuple or t is tuple or (
        isinstance(t, types.UnionType) and any(typing.get_origin(a) is tuple for a in typing.get_args(t))
    )
