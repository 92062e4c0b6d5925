"""`fedray client` (a real client outside Ray) and `fedray token` (mint a client's token)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fedray.builtin_tasks import DATASETS

__all__ = ["add_parsers", "run_client", "run_token"]


def add_parsers(sub) -> None:
    c = sub.add_parser("client", help="take part in a running job as a real client, over gRPC")
    c.add_argument("--server", required=True, help="HOST:PORT of the aggregation service")
    c.add_argument("--job-id", required=True, help="the job to take part in (the service's job id)")
    c.add_argument("--client-id", type=int, required=True, help="this client's id (its token is for this id)")
    c.add_argument("--token", default=os.environ.get("FEDRAY_CLIENT_TOKEN"),
                   help="the client's token (default: $FEDRAY_CLIENT_TOKEN); see `fedray token`")
    c.add_argument("--task", default=None,
                   help="the task, e.g. mytask:MyTask (import string, entry point or built-in name); its "
                        "client_data(--client-id) is this client's data. Default: the job's own task")
    c.add_argument("--task-params", type=json_map, default=None,
                   help="task constructor params as JSON (default: the job spec's task.params)")
    c.add_argument("--dataset", choices=DATASETS, default=None,
                   help="use a slice of a bundled data set as this client's local data")
    c.add_argument("--data-shard", default="0/1", help="I/N: the I-th of N equal slices of the training set")
    c.add_argument("--data-dir", default=None, help="folder with the --dataset's files (default: where it installs)")
    c.add_argument("--data-npz", default=None, help="local data as an .npz with arrays x and y (float features)")
    c.add_argument("--num-classes", type=int, default=10, help="labels of --data-npz are 0..N-1")
    c.add_argument("--ca", default=None, help="CA certificate (PEM) to verify the service's TLS certificate")
    c.add_argument("--cert", default=None, help="client certificate (PEM) for mutual TLS")
    c.add_argument("--key", default=None, help="client key (PEM) for mutual TLS")
    c.add_argument("--max-rounds", type=int, default=None, help="stop after training in this many rounds")
    c.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    c.add_argument("--connect-timeout-s", type=float, default=60.0,
                   help="give up (exit 1) if no aggregation service answers at --server within this many seconds")
    t = sub.add_parser("token", help="print a client's token for a job (secret from $FEDRAY_JOB_SECRET)")
    t.add_argument("--job-id", required=True, help="the job the token is for")
    t.add_argument("--client-id", type=int, required=True, help="the client the token is for")
    t.add_argument("--secret-env", default="FEDRAY_JOB_SECRET", help="environment variable holding the job secret")
    t.add_argument("--ttl-s", type=float, default=7 * 24 * 3600,
                   help="seconds the token stays valid (default: 7 days; the server's clock decides)")


def json_map(text: str) -> dict:
    """An argparse type: a JSON object (codec params, task params)."""
    try:
        v = json.loads(text)
    except ValueError:
        v = None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return v


def _local_data(a: argparse.Namespace):
    from fedray.workers.data import load_dataset
    from fedray.workers.remote import LocalData

    if a.data_npz:
        x, y = npz_data(a.data_npz, a.num_classes)
        return LocalData(x, y, a.num_classes)
    if not a.dataset:
        return None  # the task's client_data(--client-id)
    try:
        i, n = (int(v) for v in a.data_shard.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise SystemExit(f"fedray client: --data-shard takes I/N with 0 <= I < N, got {a.data_shard!r}") from None
    d = load_dataset(a.dataset, a.data_dir)
    sl = slice(i * len(d.y_train) // n, (i + 1) * len(d.y_train) // n)
    return LocalData(d.x_train[sl], d.y_train[sl], d.num_classes, d.scale, d.shift)


def npz_data(path: str, num_classes: int):
    """Arrays x (examples, features...) and y (examples,) of int labels in 0..num_classes-1 from
    an .npz; anything else exits with a one-line error naming --data-npz."""
    import numpy as np

    def bad(msg: str):
        return SystemExit(f"fedray client: error: --data-npz {path}: {msg}")

    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"x", "y"} <= set(z.files):
                raise bad(f"needs arrays named x and y, has {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as e:
        raise bad(f"cannot read it as an .npz of arrays ({e})") from None
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise bad(f"x must be numeric, shaped (examples, features...), got {x.dtype} of shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise bad(f"y must be one label per example, shape ({len(x)},), got shape {y.shape}")
    if len(y) == 0 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise bad(f"y must hold integer labels in 0..{num_classes - 1} (--num-classes {num_classes}), got "
                  + (f"{y.dtype} in {y.min()}..{y.max()}" if len(y) else "no examples"))
    return x, y.astype(np.int64)


def run_client(a: argparse.Namespace) -> int:
    import grpc

    from fedray.plugins import PluginError
    from fedray.workers.remote import LocalDataError, RealClient
    from fedray.workers.step import ClientError

    sys.path.insert(0, os.getcwd())  # --task mytask:MyTask from the current folder
    if not a.token:
        print("fedray client: error: no token; pass --token or set FEDRAY_CLIENT_TOKEN", file=sys.stderr)
        return 2
    if not a.connect_timeout_s > 0:
        print(f"fedray client: error: --connect-timeout-s must be > 0, got {a.connect_timeout_s}", file=sys.stderr)
        return 2
    client = RealClient(server=a.server, job_id=a.job_id, client_id=a.client_id, token=a.token,
                        task=a.task, task_params=a.task_params, data=_local_data(a), ca_file=a.ca, cert_file=a.cert, key_file=a.key)
    try:
        if not _connect(client, a.connect_timeout_s):
            return 1
        done = client.run(max_rounds=a.max_rounds, timeout_s=a.timeout)
    except grpc.RpcError as e:
        print(f"fedray client: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except LocalDataError as e:
        print(f"fedray client: error: {e}", file=sys.stderr)
        return 2
    except (ClientError, PluginError, ValueError) as e:  # ValueError: the task cannot do what the job asks
        print(f"fedray client: error: {'--task: ' if isinstance(e, PluginError) else ''}{e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(_outcome(a.client_id, done, client.missed_rounds()))
    return 0


def _connect(client, timeout_s: float) -> bool:
    """Say what the client waits for, wait for the service's channel; False (reported) if it never answers."""
    from fedray.workers.remote import ServiceUnreachableError

    print(f"fedray client: waiting for the aggregation service at {client.server} "
          f"(job {client.job_id}, client {client.client_id}; up to {timeout_s:g} s)", file=sys.stderr, flush=True)
    try:
        client.wait_until_reachable(timeout_s)
    except ServiceUnreachableError as e:
        print(f"fedray client: error: {e}", file=sys.stderr)
        return False
    print(f"fedray client: connected to {client.server}", file=sys.stderr, flush=True)
    return True


def _outcome(client_id: int, done: list[int], missed: list[int]) -> str:
    line = f"client {client_id}: trained in rounds {done}"
    return line + (f"; missed rounds {missed} (closed before it could take part)" if missed else "")


def run_token(a: argparse.Namespace) -> int:
    from fedray.proto.auth import client_token

    secret = os.environ.get(a.secret_env)
    if not secret:
        print(f"fedray token: error: set the job secret in ${a.secret_env}", file=sys.stderr)
        return 2
    if not a.ttl_s > 0:
        print(f"fedray token: error: --ttl-s must be > 0, got {a.ttl_s}", file=sys.stderr)
        return 2
    print(client_token(secret, a.job_id, a.client_id, ttl_s=a.ttl_s))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fedray")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parsers(sub)
    a = parser.parse_args(argv)
    return run_client(a) if a.cmd == "client" else run_token(a)


if __name__ == "__main__":
    sys.exit(main())
