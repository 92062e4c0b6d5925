"""fedray.config: the job spec, declared once as frozen pydantic models (no torch, no Ray).

`fedray.orchestrator.spec` re-exports these names; the runtime takes the same objects
(`TrainConfig`, `KeepRateConfig`, `OMCConfig`, `DeviceProfileSpec`, `ServiceLimits` are the bases
of, or the same as, their spec sections).
"""

from ._base import Section, SpecError
from .job import JobSpec, job_schema
from .sections import (
    DATASETS, MODELS, PARTITIONS, CompressionSpec, DataSpec, DeviceProfileSpec, DropoutSpec, KeepRateConfig,
    ModelSpec, OMCConfig, OMCSpec, PopulationSpec, PruningSpec, ResourceSpec, ServiceLimits, ServiceSpec, TaskSpec,
    TrackingSpec, TrainConfig, TrainingSpec,
)
from .strategy import BUFFERED_STRATEGIES, DP_STRATEGIES, STRATEGY_PARAMS, DPSpec, StrategySpec

__all__ = [
    "BUFFERED_STRATEGIES", "DATASETS", "DP_STRATEGIES", "MODELS", "PARTITIONS", "STRATEGY_PARAMS",
    "CompressionSpec", "DataSpec", "DeviceProfileSpec", "DPSpec", "DropoutSpec", "JobSpec", "KeepRateConfig",
    "ModelSpec", "OMCConfig", "OMCSpec", "PopulationSpec", "PruningSpec", "ResourceSpec", "Section",
    "ServiceLimits", "ServiceSpec", "SpecError", "StrategySpec", "TaskSpec", "TrackingSpec", "TrainConfig",
    "TrainingSpec",
    "job_schema",
]
