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
    c.add_argument("--job-id", required=True)
    c.add_argument("--client-id", type=int, required=True)
    c.add_argument("--token", default=os.environ.get("FEDRAY_CLIENT_TOKEN"),
                   help="the client's token (default: $FEDRAY_CLIENT_TOKEN); see `fedray token`")
    c.add_argument("--task", default=None,
                   help="the task, e.g. mytask:MyTask (import string, entry point or built-in name); its "
                        "client_data(--client-id) is this client's data. Default: the job's own task")
    c.add_argument("--task-params", type=_json_map, default=None,
                   help="task constructor params as JSON (default: the job spec's task.params)")
    c.add_argument("--dataset", choices=DATASETS, default=None,
                   help="use a slice of a bundled data set as this client's local data")
    c.add_argument("--data-shard", default="0/1", help="I/N: the I-th of N equal slices of the training set")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--data-npz", default=None, help="local data as an .npz with arrays x and y (float features)")
    c.add_argument("--num-classes", type=int, default=10)
    c.add_argument("--ca", default=None, help="CA certificate (PEM) to verify the service's TLS certificate")
    c.add_argument("--cert", default=None, help="client certificate (PEM) for mutual TLS")
    c.add_argument("--key", default=None, help="client key (PEM) for mutual TLS")
    c.add_argument("--max-rounds", type=int, default=None)
    c.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    t = sub.add_parser("token", help="print a client's token for a job (secret from $FEDRAY_JOB_SECRET)")
    t.add_argument("--job-id", required=True)
    t.add_argument("--client-id", type=int, required=True)
    t.add_argument("--secret-env", default="FEDRAY_JOB_SECRET")


def _json_map(text: str) -> dict:
    try:
        v = json.loads(text)
    except ValueError:
        v = None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return v


def _local_data(a: argparse.Namespace):
    import numpy as np

    from fedray.workers.data import load_dataset
    from fedray.workers.remote import LocalData

    if a.data_npz:
        z = np.load(a.data_npz)
        return LocalData(z["x"], z["y"].astype(np.int64), a.num_classes)
    if not a.dataset:
        return None  # the task's client_data(--client-id)
    try:
        i, n = (int(v) for v in a.data_shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise SystemExit(f"fedray client: --data-shard takes I/N with 0 <= I < N, got {a.data_shard!r}") from None
    d = load_dataset(a.dataset, a.data_dir)
    sl = slice(i * len(d.y_train) // n, (i + 1) * len(d.y_train) // n)
    return LocalData(d.x_train[sl], d.y_train[sl], d.num_classes, d.scale, d.shift)


def run_client(a: argparse.Namespace) -> int:
    import grpc

    from fedray.plugins import PluginError
    from fedray.workers.remote import RealClient
    from fedray.workers.step import ClientError

    sys.path.insert(0, os.getcwd())  # --task mytask:MyTask from the current folder
    if not a.token:
        print("fedray client: error: no token; pass --token or set FEDRAY_CLIENT_TOKEN", file=sys.stderr)
        return 2
    client = RealClient(server=a.server, job_id=a.job_id, client_id=a.client_id, token=a.token,
                        task=a.task, task_params=a.task_params, data=_local_data(a), ca_file=a.ca, cert_file=a.cert, key_file=a.key)
    try:
        done = client.run(max_rounds=a.max_rounds, timeout_s=a.timeout)
    except grpc.RpcError as e:
        print(f"fedray client: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ClientError, PluginError) as e:
        print(f"fedray client: error: {'--task: ' if isinstance(e, PluginError) else ''}{e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"client {a.client_id}: trained in rounds {done}")
    return 0


def run_token(a: argparse.Namespace) -> int:
    from fedray.proto.auth import client_token

    secret = os.environ.get(a.secret_env)
    if not secret:
        print(f"fedray token: error: set the job secret in ${a.secret_env}", file=sys.stderr)
        return 2
    print(client_token(secret, a.job_id, a.client_id))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fedray")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parsers(sub)
    a = parser.parse_args(argv)
    return run_client(a) if a.cmd == "client" else run_token(a)


if __name__ == "__main__":
    sys.exit(main())
