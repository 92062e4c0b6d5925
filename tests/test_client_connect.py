"""`fedray client` pointed at a port where nothing listens: it says what it waits for, then gives
up within --connect-timeout-s with exit 1 and a one-line message naming the address."""

from __future__ import annotations

import socket
import time

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


def test_connect_timeout_must_be_positive(capsys):
    rc = main(["client", "--server", "127.0.0.1:1", "--job-id", "j", "--client-id", "1", "--token", "t",
               "--connect-timeout-s", "0"])
    assert rc == 2 and "--connect-timeout-s must be > 0, got 0.0" in capsys.readouterr().err
