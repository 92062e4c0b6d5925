"""The sections of a job spec, each declared once: the runtime takes these objects directly.

Runtime names that are the same declarations: `TrainConfig` (local training, the base of
`TrainingSpec`), `KeepRateConfig` (base of `DropoutSpec`), `OMCConfig` (= `OMCSpec`),
`DeviceProfileSpec` (base of `PopulationSpec`), `ServiceLimits` (base of `ServiceSpec`).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from ._base import (
    FieldError, Fraction, NonEmptyStr, NonNegFloat, NonNegInt, PosFloat, PosInt, Section, SpecError, Tuple,
)

__all__ = [
    "DATASETS", "MODELS", "PARTITIONS", "CompressionSpec", "DataSpec", "DeviceProfileSpec", "DropoutSpec",
    "KeepRateConfig", "ModelSpec", "OMCConfig", "OMCSpec", "PopulationSpec", "PruningSpec", "ResourceSpec",
    "ServiceLimits", "ServiceSpec", "TaskSpec", "TrackingSpec", "TrainConfig", "TrainingSpec",
]

DATASETS = ("fashion-mnist", "digits", "japanese-vowels")
PARTITIONS = ("iid", "dirichlet")
MODELS = ("mlp", "cnn", "conv1d", "gru")


class DataSpec(Section):
    """Which data set, how many clients, how it is split among them."""

    _section = "data"
    dataset: Literal[DATASETS] = "fashion-mnist"
    data_dir: str | None = None
    num_clients: PosInt = 1000
    partition: Literal[PARTITIONS] = "iid"
    alpha: PosFloat = 0.5
    examples_per_client: PosInt | None = None  # set: each client holds this many examples drawn from
    # a seed (memory O(clients) ints; for populations far larger than the data set)


class ModelSpec(Section):
    """The model every client trains."""

    _section = "model"
    kind: Literal[MODELS] = "mlp"
    hidden: Tuple(Annotated[int, Field(ge=1, le=1 << 16)]) = (200,)


# "module:Name", or the name of a built-in task or of a `fedray.tasks` entry point
_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*|[A-Za-z][\w.-]*")


class TaskSpec(Section):
    """The user's task: `target` is an import string "module:Name" (a `fedray.Task` class) or a
    task name (built-in, e.g. `digits-mlp`, or a `fedray.tasks` entry point),
    `params` go to its constructor. When set, the task brings the model and the data in place of
    the `model:` and `data:` sections. Only the string's shape is checked here; importing it is
    the job of whoever runs the task."""

    _section = "task"
    target: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("target")
    @classmethod
    def _target_shape(cls, v: str | None) -> str | None:
        if v is not None and not _TARGET.fullmatch(v):
            raise FieldError("", "must be an import string 'module:Name', e.g. 'mytask:MyTask', or a task name", v)
        return v

    @model_validator(mode="after")
    def _params_need_target(self) -> "TaskSpec":
        if self.params and self.target is None:
            raise FieldError("params", "needs task.target (the class the params go to)", self.params)
        return self


class TrainConfig(Section):
    """Local training of one client (the part of `training:` that workers use)."""

    _section = "training"
    local_epochs: PosInt = 5
    batch_size: PosInt = 10
    lr: PosFloat = 0.05
    momentum: Fraction = 0.0


class TrainingSpec(TrainConfig):
    """The round loop and local training."""

    rounds: PosInt = 5
    clients_per_round: PosInt = 100
    min_clients: PosInt = 1  # a round with fewer successful updates fails
    max_failed_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5  # a round in which at least this share of its clients failed fails the job
    client_eval: bool = False  # clients also evaluate the received model on their own data


class CompressionSpec(Section):
    """Codecs by registry name: `codec` for uploads, `broadcast` for the model sent down.

    Names and parameters are checked against the codec registry by `check_plugins()` (which
    loads the codecs, and torch), not when the spec is parsed.
    """

    _section = "compression"
    codec: NonEmptyStr = "int8"
    codec_params: dict[str, Any] = Field(default_factory=dict)
    broadcast: NonEmptyStr = "identity"
    broadcast_params: dict[str, Any] = Field(default_factory=dict)

    def check_plugins(self) -> None:
        """Raises SpecError naming `compression.<field>` if a codec is unknown or its params invalid."""
        from fedray.compression import available_codecs, get_codec

        known = tuple(available_codecs())
        for name in ("codec", "broadcast"):
            v = getattr(self, name)
            if v not in known:
                raise SpecError(f"compression.{name}: must be one of {', '.join(known)}, got {v!r}")
            params = getattr(self, f"{name}_params")
            try:
                if name == "broadcast" and v == "p2u":  # stages streamed progressively (P2UConfig)
                    from fedray.workers.broadcast import p2u_config

                    p2u_config(params)
                else:
                    get_codec(v, **dict(params))
            except (ValueError, TypeError) as e:
                raise SpecError(f"compression.{name}_params: {e}") from None


class KeepRateConfig(Section):
    """Keep rates per client: `fixed` gives each client one rate for the whole job (its device
    tier), `drawn` draws a new one every round; both pick from `keep_rates` with probabilities
    `probs` (uniform when empty)."""

    _section = "dropout"
    keep_rates: Tuple(Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]) = (0.75,)
    mode: Literal["fixed", "drawn"] = "fixed"
    probs: Tuple(NonNegFloat) = ()

    @model_validator(mode="after")
    def _rates_and_probs(self) -> "KeepRateConfig":
        if not self.keep_rates:
            raise FieldError("keep_rates", "must list at least one rate in (0, 1]", self.keep_rates)
        if self.probs and (len(self.probs) != len(self.keep_rates) or abs(sum(self.probs) - 1) > 1e-6):
            raise FieldError("probs", f"must be {len(self.keep_rates)} probabilities summing to 1", self.probs)
        return self

    @property
    def rates(self) -> tuple[float, ...]:
        return self.keep_rates


class DropoutSpec(KeepRateConfig):
    """Federated Dropout: each client trains a smaller dense sub-model cut from the global one.

    `keep_rates` with one value: every client keeps that fraction of each hidden layer's units;
    several: each client draws one (`mode: fixed` once for the job, like a device tier; `drawn`
    anew each round), with probabilities `probs` (uniform when empty). Only a seed travels.
    `scaling`: inverted dropout during local training (HeteroFL's scaler): `all` scales the
    kept inputs of every dropped-into weight by units / kept, `feedforward` all but recurrent
    kernels, `none` (the default) trains the sub-model as it is (`compression.fd.input_scales`).
    """

    policy: Literal["random", "prefix", "rolling"] = "random"  # per client and round; HeteroFL; FedRolex
    scaling: Literal["none", "feedforward", "all"] = "none"


class OMCSpec(Section):
    """Online model compression: clients hold parameters quantized, decompressed per operation.

    bits: bits per stored value (int: 1-16; float: 3-16). fmt: "int" (affine uniform) or
    "float" (1 sign, `exp_bits` exponent, the rest mantissa; no inf/nan codes, subnormals kept).
    per_variable: fit (alpha, beta) per variable at every compression; false shares one transform
    fitted over all quantized variables. weights_only: quantize only weight matrices / conv
    kernels. partial_fp32_fraction: per client and round, a random set of quantizable variables
    holding at most this fraction of their parameters stays fp32. stochastic: stochastic rounding
    when re-quantizing after each step (round to nearest otherwise). block_bytes: the most fp32
    bytes of one weight decompressed at a time (rounded up to one output row or channel); null:
    1/8 of the quantized weights' fp32 bytes, clamped to [16 KiB, 4 MiB].
    """

    _section = "omc"
    bits: Annotated[int, Field(ge=1, le=16)] = 8
    fmt: Literal["int", "float"] = "int"
    exp_bits: Annotated[int, Field(ge=1, le=8)] = 5
    per_variable: bool = True
    weights_only: bool = True
    partial_fp32_fraction: Fraction = 0.0
    stochastic: bool = True
    block_bytes: Annotated[int, Field(ge=4)] | None = None

    @model_validator(mode="after")
    def _float_format(self) -> "OMCSpec":
        if self.fmt == "float" and self.bits < 3:
            raise FieldError("bits", "must be an integer >= 3 for fmt float", self.bits)
        if self.fmt == "float" and self.exp_bits > self.bits - 2:
            raise FieldError("exp_bits", f"must be in [1, bits - 2 = {self.bits - 2}] for fmt float", self.exp_bits)
        return self

    def config(self) -> "OMCSpec":
        """The runtime configuration: this object (kept for callers of the former mirror)."""
        return self


OMCConfig = OMCSpec


class DeviceProfileSpec(Section):
    """How device profiles are drawn (when no trace file is given).

    Speeds and bandwidths are lognormal: `*_median` is the median, `*_sigma` the standard
    deviation of the log. A speed of 1.0 trains `1 / seconds_per_example` examples per second.
    Each client's online probability is drawn once from Beta with mean `availability` and
    `availability_concentration` = a + b; null gives every client exactly `availability`.
    """

    _section = "population"
    speed_median: PosFloat = 1.0
    speed_sigma: NonNegFloat = 0.5
    up_mbps_median: PosFloat = 10.0
    up_sigma: NonNegFloat = 0.8
    down_mbps_median: PosFloat = 40.0
    down_sigma: NonNegFloat = 0.8
    availability: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    availability_concentration: PosFloat | None = None
    seconds_per_example: PosFloat = 1e-3  # per example per local epoch at speed 1.0
    trace_file: str | None = None  # CSV: client_id,speed,up_mbps,down_mbps[,availability]


class PopulationSpec(DeviceProfileSpec):
    """Device heterogeneity and stragglers in virtual time (FedScale's over-selection).

    Each client gets a compute speed and up/down bandwidths (lognormal, seeded; or a trace CSV);
    its virtual completion time is its compute plus the real encoded bytes over its bandwidth.
    A round over-selects ceil(K * over_select) online clients, keeps the first K finishers (and,
    with `deadline_s`, only those finishing by then) and never trains the rest.
    """

    over_select: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 1.0
    deadline_s: PosFloat | None = None

    def profile(self) -> "PopulationSpec":
        """The device profile: this object (kept for callers of the former mirror)."""
        return self


class PruningSpec(Section):
    """Gradual magnitude pruning of the global model (Zhu & Gupta's cubic schedule): sparsity
    grows from 0 at `start_round` to `target` at `end_round`; pruned weight matrices go down as
    sparse payloads and clients keep pruned weights at zero."""

    _section = "pruning"
    target: Annotated[float, Field(ge=0, le=0.999, allow_inf_nan=False)] = 0.8
    start_round: PosInt = 1
    end_round: PosInt = 10

    @model_validator(mode="after")
    def _schedule(self) -> "PruningSpec":
        if self.end_round < self.start_round + 1:
            raise FieldError("end_round", f"must be an integer >= {self.start_round + 1}", self.end_round)
        return self


class ResourceSpec(Section):
    """How the job uses the cluster."""

    _section = "resources"
    num_workers: NonNegInt = 0  # 0: one per CPU Ray reports
    clients_per_call: NonNegInt = 0  # 0: about two calls per worker per round, one with worker_reduce
    cpus_per_worker: NonNegFloat | None = None  # None: the cluster's CPUs shared by num_workers, at most 1
    gpus_per_worker: NonNegFloat = 0.0
    num_cpus: PosInt | None = None  # for an embedded local Ray only
    shards: Annotated[int, Field(ge=1, le=256)] = 1  # aggregation shards; clients map to shards by id hash
    shard_resource: NonEmptyStr | None = None  # Ray custom resource that pins shards (e.g. fedray_aggregator)
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3  # per client and round, over worker failures
    batched: bool = True  # train same-shape clients of one call together (vmap / batched matmuls)
    # simulation fast path for linear aggregation: each worker call uploads one partial sum per
    # shard of its (batched) clients' decoded updates instead of each update (workers/reduce.py)
    worker_reduce: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA in workers Ray gives a GPU
    shard_start_timeout_s: PosFloat = 120.0  # a shard not serving by then (start or restart) fails the job

    @model_validator(mode="after")
    def _cuda_needs_gpus(self) -> "ResourceSpec":
        if self.device == "cuda" and not self.gpus_per_worker:
            raise FieldError("device", "cuda needs resources.gpus_per_worker > 0 (Ray assigns the GPUs)")
        return self


class ServiceLimits(Section):
    """Per-shard limits of the aggregation service.

    max_inflight: uploads admitted at once; the next one gets RESOURCE_EXHAUSTED with a
        retry-after-ms hint (the server runs max_inflight + 4 handler threads so that it can).
    max_active: admitted uploads that decode and fold at the same time; the others wait their
        turn with their bytes in gRPC's buffers. More than the shard has cores only adds lock and
        GIL hand-offs (measured: twice the system time at 8 than at 2 on 2 cores). 0: the
        number of CPUs.
    max_inflight_per_client: uploads (and, separately, downloads) of one client at once: one
        token cannot hold every slot.
    max_streams: calls open at once (each holds a handler thread while it waits for its
        client); gRPC refuses more with RESOURCE_EXHAUSTED. Stalled streams are ended after
        `idle_timeout_s`, so this many is what a hostile client can hold for that long.
    max_streams_per_connection: HTTP/2 streams one connection may open (grpc.max_concurrent_streams).
    idle_timeout_s: a stream that keeps the server waiting this long (no message with payload
        bytes, an unread download) is cancelled (orchestrator/streams.py): a client must deliver
        one chunk (~1 MiB) per idle_timeout_s. max_stream_s bounds a call in all.
    max_header_bytes: an upload header larger than this is refused before it is parsed (before
        the token is checked); 0: 16 KiB plus 1 KiB per model tensor.
    max_metrics: client metrics entries per update.
    max_batch_updates: updates answered per UploadBatch call (the reply stays small); the rest
        of the stream is not read, and the client resends them.
    """

    _section = "service"
    max_update_bytes: PosInt = 1 << 32
    max_tensors: PosInt = 4096
    max_inflight: PosInt = 64
    max_active: NonNegInt = 0
    max_inflight_per_client: PosInt = 1
    max_streams: PosInt = 4096
    max_streams_per_connection: PosInt = 256
    idle_timeout_s: PosFloat = 30.0
    max_stream_s: PosFloat = 900.0
    max_header_bytes: NonNegInt = 0
    max_metrics: NonNegInt = 64
    max_batch_updates: PosInt = 4096

    def header_bytes(self, num_tensors: int) -> int:
        return self.max_header_bytes or (16 << 10) + (1 << 10) * num_tensors

    @property
    def active(self) -> int:
        return self.max_active or max(1, len(os.sched_getaffinity(0)))


class ServiceSpec(ServiceLimits):
    """The aggregation service: where shards listen, what workers and real clients dial (and its
    limits, `ServiceLimits`)."""

    host: NonEmptyStr | None = None  # bind address; None: all interfaces (loopback on a local Ray); shards advertise their node's IP
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0: free ports; with resources.shard_resource every shard (one per node) listens here, else shard i on port + i
    public_address: str | None = None  # host:port real clients are sent to (a Service, NodePort or load balancer)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # CA file the workers trust; default tls_cert
    tls_server_name: str | None = None  # name in the certificate workers check; default the address they dial
    tls_client_ca: str | None = None  # set: mutual TLS, clients need a certificate from this CA
    real_clients: NonNegInt = 0  # updates from real clients (outside Ray) each round waits for
    real_client_wait_s: NonNegFloat = 60.0
    job_id: str | None = None  # fixed job id (real clients need it); default: name + random suffix
    secret_env: str = "FEDRAY_JOB_SECRET"  # environment variable holding the job secret, if set

    @field_validator("public_address")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise FieldError("", "must be host:port (the address real clients dial)", v)
        return v

    @model_validator(mode="after")
    def _tls(self) -> "ServiceSpec":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise FieldError("tls_cert", "set both tls_cert and tls_key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise FieldError("tls_client_ca", "mutual TLS needs tls_cert and tls_key too")
        return self


class TrackingSpec(Section):
    """Experiment tracking of every round's metrics (fedray.orchestrator.tracking)."""

    _section = "tracking"
    tensorboard_dir: NonEmptyStr | None = None  # TensorBoard event files go to <tensorboard_dir>/<job id>/
    mlflow_uri: NonEmptyStr | None = None  # file:PATH (a local store, no server), http://host:port, sqlite:///...
    mlflow_experiment: NonEmptyStr | None = None  # default: the job's name

    @model_validator(mode="after")
    def _something(self) -> "TrackingSpec":
        if self.tensorboard_dir is None and self.mlflow_uri is None:
            raise FieldError("", "set tracking.tensorboard_dir, tracking.mlflow_uri or both "
                             "(or drop the section)")
        return self
