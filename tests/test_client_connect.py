"""`fedray client` pointed at a port where nothing listens: it says what it waits for, then gives
up within --connect-timeout-s with exit 1 and a one-line message naming the address."""

from __future__ import annotations

import socket
import time

import grpc
import numpy as np

from fedray.orchestrator.realclient_cli import _outcome, main


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_client_gives_up_on_an_address_where_nothing_listens(tmp_path, capsys):
    port = _dead_port()
    npz = tmp_path / "local.npz"
    np.savez(npz, x=np.zeros((8, 4), np.float32), y=np.zeros(8, np.int64))
    t0 = time.monotonic()
    rc = main(["client", "--server", f"127.0.0.1:{port}", "--job-id", "job-x", "--client-id", "3",
               "--token", "t", "--data-npz", str(npz), "--connect-timeout-s", "1.5"])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1
    assert took < 10, took
    assert f"waiting for the aggregation service at 127.0.0.1:{port} (job job-x" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedray client: error: no aggregation service answered at ") and f"127.0.0.1:{port}" in last
    assert "within 1.5 s" in last and "--connect-timeout-s" in last, last


def test_client_reports_rounds_it_missed():
    assert _outcome(3, [2, 4], [1, 3]) == (
        "client 3: trained in rounds [2, 4]; missed rounds [1, 3] (closed before it could take part)")
    assert _outcome(3, [1, 2], []) == "client 3: trained in rounds [1, 2]"


class _ClosedUnderUs(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.FAILED_PRECONDITION


class _Rounds:
    """A service whose rounds 1-3 open in turn and whose round 2 closes before the upload lands
    (the link's side of `RealClient.run`; the service itself is tested in test_real_clients.py)."""

    def __init__(self):
        self.last_round = 0

    def next_round(self, attempted, *, deadline, gone_after_s):
        r = next((r for r in (1, 2, 3) if r not in attempted), None)
        self.last_round = max(self.last_round, r or 0)
        return None if r is None else type("Info", (), {"round": r})()


def test_a_round_closed_under_the_client_is_missed_not_trained(monkeypatch):
    from fedray.workers.remote import RealClient

    c = RealClient(server="127.0.0.1:1", job_id="j", client_id=3, token="t")
    c.link.close()
    c.link = _Rounds()
    trained = []

    def train_round(info):
        if info.round == 2:
            raise _ClosedUnderUs()
        trained.append(info.round)

    monkeypatch.setattr(c, "train_round", train_round)
    assert c.run(timeout_s=5) == [1, 3] and trained == [1, 3]
    assert c.missed_rounds() == [2]


def test_connect_timeout_must_be_positive(capsys):
    rc = main(["client", "--server", "127.0.0.1:1", "--job-id", "j", "--client-id", "1", "--token", "t",
               "--connect-timeout-s", "0"])
    assert rc == 2 and "--connect-timeout-s must be > 0, got 0.0" in capsys.readouterr().err


def test_local_data_that_does_not_fit_the_jobs_model_is_a_one_line_error(tmp_path, capsys):
    """A live shard of a digits job (8x8 inputs): a client whose .npz has 5 features per example
    gets one line saying what does not fit, not a torch traceback."""
    import json

    from fedray.orchestrator.service import AggregationCore, create_server
    from fedray.orchestrator.spec import DataSpec, JobSpec, ModelSpec
    from fedray.proto.auth import client_token
    from fedray.workers.broadcast import make_broadcast
    from fedray.workers.models import build_model, get_params

    spec = JobSpec(data=DataSpec(dataset="digits"), model=ModelSpec(kind="mlp", hidden=(16,)))
    params = get_params(build_model("mlp", (8, 8), 10, (16,)))
    core = AggregationCore(job_id="job-f", secret="s", shapes={k: tuple(v.shape) for k, v in params.items()},
                           spec_json=json.dumps(spec.to_dict()), num_rounds=1)
    server, port = create_server(core, "127.0.0.1:0")
    core.open_round(1, make_broadcast(params, codec="identity", codec_params={}, round=1))
    npz = tmp_path / "five.npz"
    np.savez(npz, x=np.zeros((8, 5), np.float32), y=np.zeros(8, np.int64))
    try:
        rc = main(["client", "--server", f"127.0.0.1:{port}", "--job-id", "job-f", "--client-id", "2",
                   "--token", client_token("s", "job-f", 2), "--data-npz", str(npz), "--timeout", "30"])
    finally:
        server.stop(None)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert last.startswith("fedray client: error: local data of shape (5,) per example with 10 classes does not "
                           "fit the job's model"), last
