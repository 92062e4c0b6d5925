"""fedray.orchestrator: job spec, round loop, aggregation service, metrics, CLI."""

from .spec import CompressionSpec, DataSpec, JobSpec, ModelSpec, ResourceSpec, SpecError, TrainingSpec

__all__ = ["CompressionSpec", "DataSpec", "JobSpec", "ModelSpec", "ResourceSpec", "SpecError", "TrainingSpec"]
