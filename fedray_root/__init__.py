"""fedray: Ray-based federated learning orchestration.

The user-facing API: subclass `fedray.Task` (model, client data, test data, optional train and
evaluate), then `fedray.run(task, spec)`, `fedray run job.yaml` with `task: {target: ...}`, or
`fedray client --task mod:MyTask` for a real client.

Subpackages: `fedray.compression` (codecs), `fedray.proto` (wire format), `fedray.workers`
(what runs inside Ray actors), `fedray.orchestrator` (job driver, aggregation service, CLI).
Names are imported lazily, so that `import fedray.orchestrator.spec` does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Task", "TrainContext", "__version__", "connect", "run"]


def __getattr__(name: str):
    if name in ("Task", "TrainContext"):
        from . import task

        return getattr(task, name)
    if name == "run":
        from .api import run

        return run
    if name == "connect":
        from fedray.workers.exchange import connect

        return connect
    raise AttributeError(f"module 'fedray' has no attribute {name!r}")
