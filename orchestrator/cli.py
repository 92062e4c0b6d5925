"""The `fedray` command line.

    fedray demo [--dataset fashion-mnist] [--clients 1000] ... [--json out.json]
    fedray run JOB.yaml [--json out.json]
    fedray validate JOB.yaml
    fedray codecs
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .spec import CompressionSpec, DataSpec, JobSpec, ModelSpec, ResourceSpec, SpecError, TrainingSpec

__all__ = ["main"]


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes widths like 200 or 256,128, got {text!r}") from None


def _demo_parser(sub) -> None:
    d = JobSpec()
    p = sub.add_parser("demo", help="run the main job: federated training on an embedded local Ray")
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default=d.data.dataset)
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--clients", type=int, default=d.data.num_clients, help="population size")
    p.add_argument("--clients-per-round", type=int, default=d.training.clients_per_round)
    p.add_argument("--rounds", type=int, default=d.training.rounds)
    p.add_argument("--local-epochs", type=int, default=d.training.local_epochs)
    p.add_argument("--batch-size", type=int, default=d.training.batch_size)
    p.add_argument("--lr", type=float, default=d.training.lr)
    p.add_argument("--momentum", type=float, default=d.training.momentum)
    p.add_argument("--hidden", type=_hidden, default=d.model.hidden, help="MLP hidden widths, e.g. 200 or 256,128")
    p.add_argument("--partition", choices=["iid", "dirichlet"], default=d.data.partition)
    p.add_argument("--alpha", type=float, default=d.data.alpha, help="Dirichlet concentration")
    p.add_argument("--codec", default=d.compression.codec, help="upload codec (see `fedray codecs`)")
    p.add_argument("--broadcast", default=d.compression.broadcast, help="download codec")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=0, help="worker actors (0: one per CPU)")
    p.add_argument("--clients-per-call", type=int, default=d.resources.clients_per_call)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1:8265)")
    p.add_argument("--json", dest="json_path", default=None, help="write the JSON summary here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def spec_from_demo_args(a: argparse.Namespace) -> JobSpec:
    return JobSpec(
        name="demo",
        seed=a.seed,
        data=DataSpec(dataset=a.dataset, data_dir=a.data_dir, num_clients=a.clients, partition=a.partition, alpha=a.alpha),
        model=ModelSpec(hidden=tuple(a.hidden)),
        training=TrainingSpec(
            rounds=a.rounds, clients_per_round=a.clients_per_round, local_epochs=a.local_epochs,
            batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
        ),
        compression=CompressionSpec(codec=a.codec, broadcast=a.broadcast),
        resources=ResourceSpec(num_workers=a.workers, clients_per_call=a.clients_per_call, num_cpus=a.num_cpus),
    )


def _run(spec: JobSpec, *, json_path: str | None, quiet: bool, dashboard: bool = False) -> int:
    import ray

    from .engine import ensure_ray, format_summary, run_job

    started = ensure_ray(spec.resources.num_cpus, include_dashboard=dashboard)
    try:
        if dashboard:
            print(f"Ray dashboard: http://{ray.get_runtime_context().gcs_address.split(':')[0]}:8265")
        result = run_job(spec, progress=not quiet)
    finally:
        if started:
            ray.shutdown()
    print(format_summary(result))
    if json_path:
        result.write_json(json_path)
        print(f"summary written to {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedray", description="Ray-based federated learning")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _demo_parser(sub)
    r = sub.add_parser("run", help="run a job spec (YAML) on an embedded Ray, or on RAY_ADDRESS's cluster")
    r.add_argument("spec")
    r.add_argument("--json", dest="json_path", default=None)
    r.add_argument("--quiet", action="store_true")
    v = sub.add_parser("validate", help="check a job spec and print it with defaults filled in")
    v.add_argument("spec")
    sub.add_parser("codecs", help="list the registered codecs")
    a = parser.parse_args(argv)

    from fedray.workers.data import DatasetMissingError

    try:
        if a.cmd == "demo":
            return _run(spec_from_demo_args(a), json_path=a.json_path, quiet=a.quiet, dashboard=a.dashboard)
        if a.cmd == "run":
            return _run(JobSpec.from_yaml(a.spec), json_path=a.json_path, quiet=a.quiet)
        if a.cmd == "validate":
            print(JobSpec.from_yaml(a.spec).to_yaml(), end="")
            return 0
        if a.cmd == "codecs":
            from fedray.compression import available_codecs

            print("\n".join(available_codecs()))
            return 0
    except (SpecError, DatasetMissingError) as e:
        print(f"fedray: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
