"""The `fedray` command line.

    fedray demo [--dataset fashion-mnist] [--clients 1000] ... [--json out.json] [--out DIR]
    fedray run JOB.yaml [--json out.json] [--out DIR]
    fedray validate JOB.yaml
    fedray schema [--out PATH]                          (the JSON Schema of a job spec)
    fedray codecs
    fedray submit JOB.yaml [--address URL] [--follow]     (prints the job id)
    fedray status|logs|stop|wait|result JOB_ID [--address URL]
    fedray cluster up|down                                (a local Ray head from this environment)
    fedray --version

`--address` defaults to $FEDRAY_ADDRESS, else http://127.0.0.1:8265 (a Ray dashboard URL).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from fedray.builtin_tasks import DATASETS, MODELS, PARTITIONS

from . import cluster, realclient_cli
from .state import JobError
from .spec import (
    CompressionSpec, DataSpec, DPSpec, DropoutSpec, JobSpec, ModelSpec, OMCSpec, PopulationSpec, PruningSpec,
    ResourceSpec, SpecError, StrategySpec, TrackingSpec, TrainingSpec,
)

__all__ = ["build_parser", "main"]


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes widths like 200 or 256,128, got {text!r}") from None


def _demo_parser(sub) -> None:
    d = JobSpec()
    p = sub.add_parser("demo", help="run the main job: federated training on an embedded local Ray")
    p.add_argument("--dataset", choices=DATASETS, default=d.data.dataset,
                   help="the bundled data set the clients' slices come from")
    p.add_argument("--data-dir", default=None, help="folder with the data set's files (Fashion-MNIST IDX, JapaneseVowels .ts)")
    p.add_argument("--clients", type=int, default=d.data.num_clients, help="population size")
    p.add_argument("--clients-per-round", type=int, default=d.training.clients_per_round,
                   help="clients sampled each round")
    p.add_argument("--rounds", type=int, default=d.training.rounds, help="training rounds")
    p.add_argument("--local-epochs", type=int, default=d.training.local_epochs, help="epochs each client trains")
    p.add_argument("--batch-size", type=int, default=d.training.batch_size, help="client minibatch size")
    p.add_argument("--lr", type=float, default=d.training.lr, help="client SGD learning rate")
    p.add_argument("--momentum", type=float, default=d.training.momentum, help="client SGD momentum")
    p.add_argument("--hidden", type=_hidden, default=d.model.hidden, help="MLP hidden widths, e.g. 200 or 256,128")
    p.add_argument("--partition", choices=PARTITIONS, default=d.data.partition,
                   help="how examples are split among clients")
    p.add_argument("--alpha", type=float, default=d.data.alpha, help="Dirichlet concentration")
    p.add_argument("--codec", default=d.compression.codec, help="upload codec (see `fedray codecs`)")
    p.add_argument("--broadcast", default=d.compression.broadcast, help="download codec")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice of the job")
    p.add_argument("--workers", type=int, default=0, help="worker actors (0: one per CPU)")
    p.add_argument("--clients-per-call", type=int, default=d.resources.clients_per_call,
                   help="clients a worker actor trains per Ray call")
    p.add_argument("--worker-reduce", action="store_true",
                   help="each worker call uploads one partial sum per shard (linear aggregation only)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker actor (workers then train on CUDA)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1:8265)")
    p.add_argument("--json", dest="json_path", default=None, help="write the JSON summary here")
    p.add_argument("--out", default=None, help="write the results directory here (summary, rounds, model, plots)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--model", choices=MODELS, default=d.model.kind,
                   help="cnn: --hidden C1,C2,FC; conv1d, gru: for japanese-vowels")
    p.add_argument("--codec-params", type=realclient_cli.json_map, default={}, help='upload codec params as JSON, e.g. \'{"granularity": "channel"}\' for the default int8 '
                        '(with --codec qsgd: \'{"levels": 16}\'; see `fedray codecs`)')
    p.add_argument("--broadcast-params", type=realclient_cli.json_map, default={},
                   help='download codec params as JSON; P2U: \'{"stage_bits": [4, 4], "start_after": 0}\'')
    p.add_argument("--strategy", default="fedavg", help="fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, ...")
    p.add_argument("--server-lr", type=float, default=None, help="server learning rate (FedAvgM, FedAdam, ...)")
    p.add_argument("--shards", type=int, default=1, help="aggregation shards (gRPC servers)")
    p.add_argument("--keep-rate", type=_rates, default=None,
                   help="Federated Dropout keep rate(s), e.g. 0.75 or 0.5,0.75,1 (drawn per client)")
    p.add_argument("--dropout-policy", choices=["random", "prefix", "rolling"], default="random",
                   help="Federated Dropout: which units each client keeps")
    p.add_argument("--dropout-scaling", choices=["none", "feedforward", "all"], default="none",
                   help="Federated Dropout: scale kept units by units / kept while training (inverted dropout)")
    p.add_argument("--omc-bits", type=int, default=None, help="OMC: train with parameters stored at this many bits")
    p.add_argument("--dp-noise", type=float, default=None, help="differential privacy: noise multiplier")
    p.add_argument("--dp-clip", type=float, default=1.0, help="differential privacy: update clip norm")
    p.add_argument("--prune-target", type=float, default=None,
                   help="gradual magnitude pruning of the global model to this sparsity (cubic schedule)")
    p.add_argument("--prune-end", type=int, default=None, help="round at which pruning reaches its target")
    p.add_argument("--over-select", type=float, default=None,
                   help="stragglers: over-select this factor of clients, keep the first finishers (virtual time)")
    p.add_argument("--deadline", type=float, default=None, help="stragglers: round deadline in virtual seconds")
    p.add_argument("--client-eval", action="store_true", help="clients also evaluate each received model on their data")
    _tracking_flags(p)


def _tracking_flags(p) -> None:
    p.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="write every round's metrics as TensorBoard event files under DIR/<job id> "
                        "(tracking.tensorboard_dir)")
    p.add_argument("--mlflow", metavar="URI", default=None,
                   help="log every round's metrics to MLflow: file:PATH (no server) or http://host:port "
                        "(tracking.mlflow_uri)")


def _with_tracking(spec: JobSpec, a: argparse.Namespace) -> JobSpec:
    """The spec with --tensorboard / --mlflow laid over its `tracking:` section."""
    if a.tensorboard is None and a.mlflow is None:
        return spec
    base = spec.tracking or TrackingSpec(tensorboard_dir=a.tensorboard, mlflow_uri=a.mlflow)
    tracking = base.replace(tensorboard_dir=a.tensorboard or base.tensorboard_dir,
                            mlflow_uri=a.mlflow or base.mlflow_uri)
    return spec.replace(tracking=tracking)


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep-rate takes rates like 0.75 or 0.5,1, got {text!r}") from None


def spec_from_demo_args(a: argparse.Namespace) -> JobSpec:
    return JobSpec(
        name="demo",
        seed=a.seed,
        data=DataSpec(dataset=a.dataset, data_dir=a.data_dir, num_clients=a.clients, partition=a.partition, alpha=a.alpha),
        model=ModelSpec(kind=a.model, hidden=tuple(a.hidden)),
        training=TrainingSpec(
            rounds=a.rounds, clients_per_round=a.clients_per_round, local_epochs=a.local_epochs,
            batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, client_eval=a.client_eval,
        ),
        compression=CompressionSpec(codec=a.codec, codec_params=a.codec_params, broadcast=a.broadcast,
                                    broadcast_params=a.broadcast_params),
        resources=ResourceSpec(num_workers=a.workers, clients_per_call=a.clients_per_call, num_cpus=a.num_cpus,
                               shards=a.shards, gpus_per_worker=a.gpus_per_worker, worker_reduce=getattr(a, "worker_reduce", False)),
        strategy=StrategySpec(name=a.strategy, **({"server_lr": a.server_lr} if a.server_lr is not None else {})),
        dropout=DropoutSpec(keep_rates=a.keep_rate, mode="drawn" if len(a.keep_rate) > 1 else "fixed",
                            policy=a.dropout_policy, scaling=a.dropout_scaling) if a.keep_rate else None,
        omc=OMCSpec(bits=a.omc_bits) if a.omc_bits else None,
        privacy=DPSpec(noise_multiplier=a.dp_noise, clip_norm=a.dp_clip) if a.dp_noise is not None else None,
        pruning=PruningSpec(target=a.prune_target, start_round=1, end_round=a.prune_end or max(a.rounds, 2))
        if a.prune_target is not None else None,
        population=PopulationSpec(over_select=a.over_select or 1.0, deadline_s=a.deadline)
        if a.over_select is not None or a.deadline is not None else None,
    )


# The YAML field each `fedray demo` flag sets: errors about the field name the flag instead.
_DEMO_FLAGS = {
    "data.dataset": "--dataset", "data.data_dir": "--data-dir", "data.num_clients": "--clients",
    "data.partition": "--partition", "data.alpha": "--alpha", "model.kind": "--model", "model.hidden": "--hidden",
    "training.rounds": "--rounds", "training.clients_per_round": "--clients-per-round",
    "training.local_epochs": "--local-epochs", "training.batch_size": "--batch-size", "training.lr": "--lr",
    "training.momentum": "--momentum", "compression.codec_params": "--codec-params", "compression.codec": "--codec",
    "compression.broadcast_params": "--broadcast-params", "compression.broadcast": "--broadcast", "seed": "--seed",
    "resources.num_workers": "--workers", "resources.clients_per_call": "--clients-per-call",
    "resources.worker_reduce": "--worker-reduce",
    "resources.num_cpus": "--num-cpus", "resources.shards": "--shards", "resources.gpus_per_worker": "--gpus-per-worker",
    "strategy.name": "--strategy", "strategy.server_lr": "--server-lr", "dropout.keep_rates": "--keep-rate",
    "dropout.policy": "--dropout-policy", "dropout.scaling": "--dropout-scaling", "omc.bits": "--omc-bits", "privacy.noise_multiplier": "--dp-noise",
    "privacy.clip_norm": "--dp-clip", "pruning.target": "--prune-target", "pruning.end_round": "--prune-end",
    "population.over_select": "--over-select", "population.deadline_s": "--deadline",
}


def _as_flag_error(e: SpecError) -> SpecError:
    """`training.rounds: must be ...` becomes `--rounds: must be ...` (longest matching field)."""
    import re

    path, sep, rest = str(e).partition(": ")
    fields = sorted(_DEMO_FLAGS, key=len, reverse=True)
    for field in fields:
        if sep and (path == field or path.startswith(field + ".") or path.startswith(field + "[")):
            for other in fields:  # "... more than data.num_clients=1000" -> "... more than --clients=1000"
                rest = re.sub(rf"(?<![\w.]){re.escape(other)}(?![\w])", _DEMO_FLAGS[other], rest)
            return SpecError(f"{_DEMO_FLAGS[field]}: {rest}")
    return e


def demo_spec(a: argparse.Namespace) -> JobSpec:
    """The demo's job spec, codecs checked; errors name the flag to change.

    Raises:
        SpecError: e.g. `--rounds: must be an integer >= 1, got 0`.
    """
    try:
        spec = spec_from_demo_args(a)
        spec.check_plugins()
    except SpecError as e:
        raise _as_flag_error(e) from None
    return spec


def check_data_folder(spec: JobSpec) -> None:
    """`data.data_dir`, when set, must be a folder here holding the data set's files (checked by
    `fedray validate` before a job starts, not when its first client loads data).

    Raises:
        SpecError: naming data.data_dir and what to change.
    """
    from pathlib import Path

    from fedray.builtin_tasks import check_builtin_dataset_files
    from fedray.workers.data import DatasetMissingError

    d = spec.data.data_dir
    if d is None or (spec.task is not None and spec.task.target is not None):
        return
    if not Path(d).is_dir():
        raise SpecError(f"data.data_dir: no folder {d!r} on this machine; fix the path, or leave data_dir unset "
                        "to use the installed data set")
    try:
        check_builtin_dataset_files(spec.data.dataset, d)
    except DatasetMissingError as e:
        raise SpecError(f"data.data_dir: {e}") from None


def _run(
    spec: JobSpec, *, json_path: str | None, quiet: bool, dashboard: bool = False, out: str | None = None,
    emit_result: bool = False, resume: bool = False, base_dir: str | None = None,
) -> int:
    import ray

    from .engine import ensure_ray, format_summary, run_job

    started = ensure_ray(spec.resources.num_cpus, include_dashboard=dashboard)
    try:
        if dashboard:
            print(f"Ray dashboard: http://{ray.get_runtime_context().gcs_address.split(':')[0]}:8265")
        result = run_job(spec, progress=not quiet, resume=resume, base_dir=base_dir)
    finally:
        if started:
            ray.shutdown()
    print(format_summary(result))
    if json_path:
        result.write_json(json_path)
        print(f"summary written to {json_path}")
    out_dir = None
    if out:
        from .results import write_results

        out_dir = os.path.abspath(out)
        write_results(result, out_dir)
        print(f"results written to {out_dir}")
    if emit_result:
        from .client import format_result_line

        print(format_result_line(result.summary(), results_dir=out_dir), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `fedray` command line (the Helm chart's RayJob entrypoint is checked against it)."""
    parser = argparse.ArgumentParser(prog="fedray", description="Ray-based federated learning")
    parser.add_argument("--version", action="version", version=f"fedray {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _demo_parser(sub)
    r = sub.add_parser("run", help="run a job spec (YAML) on an embedded Ray, or on RAY_ADDRESS's cluster")
    r.add_argument("spec", help="the job spec (YAML)")
    r.add_argument("--json", dest="json_path", default=None, help="write the JSON summary here")
    r.add_argument("--out", default=None, help="write the results directory here (summary, rounds, model, plots)")
    # internal: the entry point of submitted jobs ends with a FEDRAY_RESULT line for `fedray result`
    r.add_argument("--emit-result", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in the spec's checkpoint_dir (after a crash or kill)")
    r.add_argument("--checkpoint-dir", default=None, help="checkpoint after every round here (overrides the spec)")
    _tracking_flags(r)
    v = sub.add_parser("validate", help="check a job spec and print it with defaults filled in")
    v.add_argument("spec", help="the job spec (YAML)")
    sc = sub.add_parser("schema", help="print the JSON Schema of a job spec (or write it with --out)")
    sc.add_argument("--out", default=None, help="write the schema to this file instead of printing it")
    sub.add_parser("codecs", help="list the registered codecs")
    _remote_parsers(sub)
    realclient_cli.add_parsers(sub)
    cluster.add_parser(sub)
    _show_defaults(parser)
    return parser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, unless the help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or no_default or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """`--help` of fedray and of each command shows defaults."""
    parser.formatter_class = _DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                p.formatter_class = _DefaultsFormatter


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "schema":  # no torch, no Ray
        return _schema(a.out)

    from fedray.workers.data import DatasetMissingError

    from .tracking import TrackingError

    try:
        if a.cmd == "demo":
            return _run(_with_tracking(demo_spec(a), a), json_path=a.json_path, quiet=a.quiet,
                        dashboard=a.dashboard, out=a.out)
        if a.cmd == "run":
            spec = JobSpec.from_yaml(a.spec)
            if a.checkpoint_dir:
                spec = spec.replace(checkpoint_dir=a.checkpoint_dir)
            spec = _with_tracking(spec, a)
            if a.resume and not spec.checkpoint_dir:
                raise SpecError("checkpoint_dir: --resume needs a checkpoint_dir in the spec or --checkpoint-dir")
            return _run(spec, json_path=a.json_path, quiet=a.quiet, out=a.out, emit_result=a.emit_result,
                        resume=a.resume, base_dir=_spec_dir(a.spec))
        if a.cmd == "cluster":
            return cluster.main(a)
        if a.cmd == "client":
            return realclient_cli.run_client(a)
        if a.cmd == "token":
            return realclient_cli.run_token(a)
        if a.cmd in _REMOTE:
            return _remote(a)
        if a.cmd == "validate":
            from fedray.api import prepare_task

            spec = JobSpec.from_yaml(a.spec)
            spec.check_plugins()
            check_data_folder(spec)
            task = prepare_task(spec, base_dir=_spec_dir(a.spec))  # imports task.target, checks it against the spec
            print(spec.to_yaml(), end="")
            print(f"# task: {task.describe()}, {task.num_clients()} clients", file=sys.stderr)
            return 0
        if a.cmd == "codecs":
            from fedray.compression import available_codecs

            print("\n".join(available_codecs()))
            return 0
    except (SpecError, DatasetMissingError, TrackingError) as e:
        print(f"fedray: error: {e}", file=sys.stderr)
        return 2
    except JobError as e:  # the job started and failed: the message names the round and the cause
        print(f"fedray: error: {e}", file=sys.stderr)
        return 1
    return 1


def _spec_dir(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedray")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


def _schema(out: str | None) -> int:
    from fedray.config.job import schema_json

    text = schema_json()
    if out is None:
        print(text, end="")
        return 0
    try:
        with open(out, "w") as f:
            f.write(text)
    except OSError as e:
        print(f"fedray: error: cannot write the schema to {out}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


_REMOTE = ("submit", "status", "logs", "stop", "wait", "result")


def _remote_parsers(sub) -> None:
    addr = os.environ.get("FEDRAY_ADDRESS", "http://127.0.0.1:8265")
    helps = {
        "submit": "validate a job spec and submit it to a Ray cluster; prints the job id",
        "status": "print a submitted job's status",
        "logs": "print a submitted job's log",
        "stop": "stop a submitted job",
        "wait": "wait for a submitted job to finish; exit 0 only when it SUCCEEDED",
        "result": "print a finished job's summary (and write it with --json)",
    }
    for name in _REMOTE:
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("spec" if name == "submit" else "job_id", metavar="JOB.yaml" if name == "submit" else "JOB_ID",
                       help="the job spec (YAML)" if name == "submit" else "the id `fedray submit` printed")
        p.add_argument("--address", default=addr, help="Ray dashboard URL (default: $FEDRAY_ADDRESS or %(default)s)")
        p.add_argument("--token", default=None, help="Ray auth token (default: $RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        if name in ("submit", "logs"):
            p.add_argument("--follow", action="store_true", help="stream the log until the job ends")
        if name == "submit":
            p.add_argument("--no-ship-code", dest="ship_code", action="store_false",
                           help="use the fedray installed on the cluster instead of shipping this one")
            p.add_argument("--results-root", default=None, help="results folder on the cluster (one sub-folder per job)")
            p.add_argument("--code-dir", default=None,
                           help="folder of the task's code to ship as the job's working directory (default: the "
                                "spec's folder when task.target is an import string)")
            p.add_argument("--py-module", action="append", default=[],
                           help="a package folder or wheel to ship onto the cluster's import path (repeatable)")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
        if name == "result":
            p.add_argument("--json", dest="json_path", default=None, help="write the summary JSON here")


def _remote(a: argparse.Namespace) -> int:
    from .client import DEFAULT_RESULTS_ROOT, Client, ClientError

    spec = JobSpec.from_yaml(a.spec) if a.cmd == "submit" else None  # bad specs fail before any connection
    if spec is not None:
        spec.check_plugins()
        if spec.task is not None and spec.task.target is not None:
            from .client import _check_target

            _check_target(spec, a.code_dir or _spec_dir(a.spec))
    try:
        client = Client(a.address, token=a.token, ship_code=getattr(a, "ship_code", True),
                        results_root=getattr(a, "results_root", None) or DEFAULT_RESULTS_ROOT)
        if a.cmd == "submit":
            job_id = client.submit(a.spec, code_dir=a.code_dir, py_modules=a.py_module)
            print(job_id, flush=True)
            if a.follow:
                _print_chunks(_readable_result(client.logs(job_id, follow=True)))
                return _exit_for(client.status(job_id))
            return 0
        if a.cmd == "status":
            print(client.status(a.job_id))
        elif a.cmd == "logs":
            logs = client.logs(a.job_id, follow=a.follow)
            _print_chunks(_readable_result(logs) if a.follow else logs)
        elif a.cmd == "stop":
            print("stop requested" if client.stop(a.job_id) else "job was not running")
        elif a.cmd == "wait":
            st = client.wait(a.job_id, timeout=a.timeout)
            print(st)
            return _exit_for(st)
        elif a.cmd == "result":
            return _print_result(client, a.job_id, a.json_path)
        return 0
    except (ClientError, TimeoutError) as e:
        print(f"fedray: error: {e}", file=sys.stderr)
        return 1


def _print_chunks(chunks) -> None:
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _readable_result(chunks):
    """Log chunks with the job's FEDRAY_RESULT line (one line of summary JSON, for `fedray result`)
    replaced by the summary `fedray run` prints (`format_summary`)."""
    from .client import RESULT_MARKER

    pending = ""
    for chunk in chunks:
        pending += chunk
        lines = pending.split("\n")
        pending = lines.pop()  # the unfinished last line waits for the next chunk
        if lines:
            yield "".join(_summary_text(ln[len(RESULT_MARKER):]) if ln.startswith(RESULT_MARKER) else ln + "\n"
                          for ln in lines)
    if pending:
        yield _summary_text(pending[len(RESULT_MARKER):]) if pending.startswith(RESULT_MARKER) else pending


def _summary_text(payload: str) -> str:
    import json

    from .client import RESULT_MARKER
    from .engine import JobResult, RoundRecord, format_summary

    try:
        s = json.loads(payload)
        result = JobResult(s["job_id"], JobSpec.from_dict(s["spec"]), [RoundRecord(**r) for r in s["rounds"]],
                           wall_s=s["wall_s"])
    except (ValueError, KeyError, TypeError, SpecError):  # not a summary this fedray reads: show it as is
        return RESULT_MARKER + payload + "\n"
    return format_summary(result) + "\n"


def _exit_for(status) -> int:
    return 0 if str(status) == "SUCCEEDED" else 1


def _print_result(client, job_id: str, json_path: str | None) -> int:
    import json

    res = client.result(job_id, model=False)
    s = res.summary
    print(f"job {job_id} ({s.get('job_id')}): final accuracy {res.final_accuracy:.4f}, "
          f"{len(res.rounds)} rounds, {s.get('wall_s', 0.0):.1f}s")
    print(f"  bytes up {s['bytes_up_total'] / 1e6:.2f}MB (fp32 {s['bytes_up_fp32'] / 1e6:.2f}MB, codec {s['codec']}), "
          f"down {s['bytes_down_total'] / 1e6:.2f}MB (codec {s['broadcast']})")
    print(f"  results on the cluster: {res.results_dir}")
    for r in res.rounds:
        print(f"  round {r['round']}: accuracy {r['accuracy']:.4f}, clients {r['clients']}, {r['wall_s']:.2f}s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(s, f, indent=2)
        print(f"summary written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
