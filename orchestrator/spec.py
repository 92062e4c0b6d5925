"""The typed job spec, loadable from YAML: the names of `fedray.config`, where each section is
declared once as a frozen pydantic model (this module keeps the import path).

Every error names the field by its dotted path and says what is allowed, e.g.
`SpecError: training.rounds: must be an integer >= 1, got 0`. Parsing imports neither torch nor
Ray; `JobSpec.check_plugins()` checks codec names and parameters against their registry.

Build a spec with `JobSpec.from_yaml(path)`, `JobSpec.from_dict(mapping)` or the constructors
(`JobSpec(training=TrainingSpec(rounds=3))`); change one with `spec.replace(field=value)` (which
validates again; `model_copy(update=...)` does not).
"""

from fedray.config import (
    DATASETS, MODELS, PARTITIONS, CompressionSpec, DataSpec, DPSpec, DropoutSpec, JobSpec, ModelSpec, OMCSpec,
    PopulationSpec, PruningSpec, ResourceSpec, ServiceSpec, SpecError, StrategySpec, TaskSpec, TrackingSpec,
    TrainingSpec, job_schema,
)

__all__ = [
    "CompressionSpec",
    "DATASETS",
    "DataSpec",
    "DPSpec",
    "DropoutSpec",
    "MODELS",
    "OMCSpec",
    "PARTITIONS",
    "PopulationSpec",
    "PruningSpec",
    "JobSpec",
    "ModelSpec",
    "ResourceSpec",
    "ServiceSpec",
    "SpecError",
    "StrategySpec",
    "TaskSpec",
    "TrackingSpec",
    "TrainingSpec",
    "job_schema",
]
