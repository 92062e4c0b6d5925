"""`JobSpec`: the whole job spec, its cross-field checks, YAML and JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Mapping

import yaml
from pydantic import Field, model_validator

from ._base import FieldError, Section, SpecError
from .sections import (
    CompressionSpec, DataSpec, DropoutSpec, ModelSpec, OMCSpec, PopulationSpec, PruningSpec, ResourceSpec,
    ServiceSpec, TaskSpec, TrackingSpec, TrainingSpec,
)
from .strategy import DPSpec, StrategySpec

__all__ = ["JobSpec", "job_schema"]


class JobSpec(Section):
    """Everything a fedray job can set. Build it in Python or load it with `from_yaml`.

    Parsing checks every field and the combinations, and imports neither torch nor Ray; names
    resolved from plug-ins (codecs, and later tasks) are checked by `check_plugins()`.
    """

    name: Annotated[str, Field(min_length=1)] = "fedray-job"
    seed: Annotated[int, Field(ge=0, le=(1 << 63) - 1)] = 0
    task: TaskSpec | None = None  # the user's task (model + data); replaces data: and model:
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    privacy: DPSpec | None = None  # client-level differential privacy (clip + Gaussian noise)
    dropout: DropoutSpec | None = None  # Federated Dropout subnets
    omc: OMCSpec | None = None  # OMC compressed training (downloads and uploads in its stored form)
    population: PopulationSpec | None = None  # device profiles, over-selection, deadline (virtual time)
    pruning: PruningSpec | None = None  # server-side gradual magnitude pruning
    checkpoint_dir: str | None = None  # checkpoint after every round here; `fedray run --resume` continues
    tracking: TrackingSpec | None = None  # TensorBoard / MLflow logging of every round's metrics

    @model_validator(mode="after")
    def _combinations(self) -> "JobSpec":
        if self.privacy is not None:
            self.privacy.check_strategy(self.strategy.name)
        if self.dropout is not None and self.strategy.needs_all_updates:
            raise FieldError("dropout", f"Federated Dropout averages per coordinate; strategy.name "
                             f"{self.strategy.name!r} needs whole updates (use fedavg, fedavgm, fedadam, ...)")
        if self.pruning is not None and (self.omc is not None or self.compression.broadcast == "p2u"):
            raise FieldError("pruning", "the pruned model goes down as a sparse payload; it cannot be combined "
                             "with omc or broadcast: p2u")
        if self.omc is not None:
            if self.dropout is not None:
                raise FieldError("omc", "OMC and Federated Dropout cannot be combined yet; set one of them")
            if self.training.momentum:
                raise FieldError("omc", "OMC training is plain SGD; set training.momentum to 0")
            if self.strategy.proximal_mu:
                raise FieldError("omc", "OMC training cannot use FedProx; set strategy.proximal_mu to 0")
        if self.resources.worker_reduce:
            self._check_worker_reduce()
        if self.training.min_clients > self.training.clients_per_round + self.service.real_clients:
            raise FieldError("training.min_clients", f"{self.training.min_clients} is more than the "
                             f"{self.training.clients_per_round} clients per round (plus real clients)")
        if self.service.public_address and self.resources.shards > 1:
            raise FieldError("service.public_address", "one public address reaches one shard; use resources.shards: 1 "
                             "for real clients behind a Service (or leave public_address unset)")
        if self.task is not None and self.task.target is not None:
            d = DataSpec()
            data_changed = (self.data.dataset, self.data.data_dir) != (d.dataset, d.data_dir)
            for where, changed in (("model", self.model != ModelSpec()), ("data.dataset", data_changed)):
                if changed:
                    raise FieldError(where, f"task.target {self.task.target!r} brings its own model and data; "
                                     f"remove {where} or the task")
        elif self.training.clients_per_round > self.data.num_clients:
            raise FieldError("training.clients_per_round", f"{self.training.clients_per_round} is more than "
                             f"data.num_clients={self.data.num_clients}; lower it or add clients")
        return self

    def _check_worker_reduce(self) -> None:
        """Partial sums need a linear aggregate of whole, unclipped, uncapped updates from simulated clients."""
        st = self.strategy
        why = [w for w, bad in (
            ("privacy (DP clips and noises each update)", self.privacy is not None),
            (f"strategy.name {st.name!r} (it needs every update)", st.needs_all_updates),
            ("strategy.clip_norm", st.clip_norm is not None),
            ("strategy.max_weight_share (caps each client's weight)", st.max_weight_share is not None),
            ("dropout", self.dropout is not None), ("omc", self.omc is not None), ("pruning", self.pruning is not None),
            ("service.real_clients", self.service.real_clients > 0), ("training.client_eval", self.training.client_eval),
        ) if bad]
        if why:
            raise FieldError("resources.worker_reduce", "partial sums per worker work only for linear aggregation "
                             f"of simulated clients; it cannot be combined with {', '.join(why)}: set it to false")

    # -- conversion ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Any) -> "JobSpec":
        """Build from nested mappings; unknown keys are errors that name the key.

        Raises:
            SpecError: `d` is not a mapping, or a field or a combination is invalid.
        """
        if not isinstance(d, Mapping):
            raise SpecError(f"job spec: must be a mapping of sections (name, seed, data, training, ...), got {d!r}")
        return cls.model_validate(dict(d))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JobSpec":
        """Load a YAML job spec.

        Raises:
            SpecError: the file is missing, empty, not YAML, not a mapping, or a field is invalid.
        """
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"job spec file {str(p)!r} does not exist")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"{p}: not valid YAML: {e}") from None
        if d is None:
            raise SpecError(f"{p}: the job spec is empty; write at least one section, e.g. `training: {{rounds: 5}}` "
                            f"(`fedray validate` prints every field with its default)")
        if not isinstance(d, Mapping):
            raise SpecError(f"{p}: a job spec must be a mapping of sections (name, seed, data, training, ...), "
                            f"got a {type(d).__name__}: {d!r:.80}")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples as lists), every field included."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check_plugins(self) -> None:
        """Check the names that plug-in registries resolve (codecs and their parameters); this
        loads them, and torch. `fedray validate` and `run_job` call it.

        Raises:
            SpecError: naming the field, e.g. `compression.codec: must be one of ...`.
        """
        self.compression.check_plugins()


def job_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job spec, as `fedray schema` prints it."""
    s = JobSpec.model_json_schema()
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["title"] = "fedray job spec"
    return s


def schema_json() -> str:
    return json.dumps(job_schema(), indent=2, sort_keys=False) + "\n"
