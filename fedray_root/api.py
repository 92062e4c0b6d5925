"""`fedray.run(task, spec)`: run a job from Python (a script or a notebook) and get its result.

    import fedray
    result = fedray.run(MyTask(), {"training": {"rounds": 5, "clients_per_round": 10}})
    print(result.final_metrics)
"""

from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ["prepare_task", "run"]


def prepare_task(spec, task=None, *, base_dir: str | None = None):
    """The job's task (`task` if given, else the spec's), checked against the spec: enough
    clients for a round, Federated Dropout only for a task with an `fd_layout`, OMC only with
    the default training loop.

    Raises:
        SpecError: naming the field (`task.target`, `training.clients_per_round`, `dropout`, `omc`).
    """
    from fedray.orchestrator.spec import SpecError

    from .plugins import task_for_spec
    from .task import overrides

    if task is None:
        task = task_for_spec(spec, base_dir=base_dir)
    name = task.describe()
    try:
        n = int(task.num_clients())
    except Exception as e:
        raise SpecError(f"task: {name}.num_clients() failed: {type(e).__name__}: {e}") from None
    if spec.training.clients_per_round > n:
        raise SpecError(f"training.clients_per_round: {spec.training.clients_per_round} is more than the "
                        f"{n} clients of {name}; lower it or add clients")
    if spec.dropout is not None and task.fd_layout() is None:
        raise SpecError(f"dropout: {name}'s model has no Federated Dropout layout (Task.fd_layout returns None); "
                        f"remove dropout or implement fd_layout and fd_model")
    if spec.omc is not None and overrides(task, "train"):
        raise SpecError(f"omc: OMC trains with fedray's own loop, but {name} overrides Task.train; remove omc")
    return task


def run(task=None, spec: Any = None, *, progress: bool = False, log=print, out: str | os.PathLike | None = None):
    """Run a federated job on an embedded local Ray (or RAY_ADDRESS's cluster) and return its
    `JobResult` (`.final_metrics`, `.rounds`, `.params`, `.summary()`).

    Args:
        task: a `fedray.Task` object, an import string ("mod:MyTask"), or None (the spec's).
        spec: a `JobSpec`, a mapping of spec sections, a YAML path, or None (defaults).
        progress: show progress bars.
        out: also write the results directory (summary, rounds, model, plots) here.

    Raises:
        SpecError: the spec or the task is invalid (the message names the field).
        JobError: a round ended with fewer than `training.min_clients` updates.
    """
    from fedray.orchestrator.engine import ensure_ray, run_job
    from fedray.orchestrator.spec import JobSpec, TaskSpec

    base_dir = None
    if spec is None:
        spec = JobSpec()
    elif isinstance(spec, (str, os.PathLike)):
        base_dir = os.path.dirname(os.path.abspath(spec))
        spec = JobSpec.from_yaml(spec)
    elif isinstance(spec, Mapping):
        spec = JobSpec.from_dict(spec)
    if isinstance(task, str):
        import dataclasses

        spec = dataclasses.replace(spec, task=TaskSpec(target=task))
        task = None
    started = ensure_ray(spec.resources.num_cpus)
    try:
        result = run_job(spec, progress=progress, log=log, task=task, base_dir=base_dir)
    finally:
        if started:
            import ray

            ray.shutdown()
    if out is not None:
        from fedray.orchestrator.results import write_results

        write_results(result, out)
    return result
