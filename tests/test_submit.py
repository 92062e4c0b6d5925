"""Submitting jobs to a real Ray head started with `ray start --head`, through the Python client
and through the CLI; the dashboard's job list and Ray's metrics port.

The head is this module's own: `ray start --head --block` in a new process session, bound to
127.0.0.1, with its own --temp-dir and free ports, so it never touches the session fixture's Ray
or anyone else's. Teardown signals only this head's processes by pid (its process group, plus the
workers whose RAY_RAYLET_PID is its raylet): SIGTERM, then SIGKILL, since gcs_server and raylet
outlive a SIGTERM. Never `ray stop`, which would kill every Ray on the machine. The pytest process never calls ray.init: everything goes over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedray.orchestrator import cli
from fedray.orchestrator.client import Client, ClientError, auth_token
from fedray.orchestrator.cluster import _head_pids  # the head's processes, as `fedray cluster down` finds them
from fedray.orchestrator.results import RESULT_FILES
from fedray.orchestrator.spec import SpecError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _get(url: str, *, token: str | None, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _stop_head(proc: subprocess.Popen) -> None:
    pids = _head_pids(proc.pid)  # start_new_session made the group id the `ray start` pid
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    for pid in pids | _head_pids(proc.pid):  # gcs_server and raylet outlive SIGTERM
        _signal(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with the dashboard and a metrics port; yields (dashboard URL, metrics URL)."""
    with start_head() as urls:
        yield urls


@contextlib.contextmanager
def start_head(**extra_env: str):
    """Start this module's kind of head (`extra_env` added to its environment, e.g.
    RAY_AUTH_MODE="disabled"); yields (dashboard URL, metrics URL); stops it by pid."""
    gcs, dash, metrics, client_srv, agent_http, agent_grpc, renv = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="frh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # Ray's memory monitor looks at the whole machine, where other suites run at the same
           # time: it killed this head's workers once. The kernel's OOM killer still applies.
           "RAY_memory_monitor_refresh_ms": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra_env}  # jobs' `python` is this venv's
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=4",
           f"--temp-dir={temp}", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client_srv}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={renv}", "--include-dashboard=true", f"--object-store-memory={200 << 20}"]
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {(Path(temp) / 'ray-start.log').read_text()[-2000:]}")
            try:
                if _get(f"{url}/api/version", token=auth_token())[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray dashboard did not come up in 90 s")
            time.sleep(1)
        yield url, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _fedray(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedray"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})


@pytest.mark.slow
def test_quickstart_via_client_and_cli(ray_head, tmp_path, capsys):
    url, metrics_url = ray_head
    results = tmp_path / "results"
    client = Client(url, results_root=str(results))
    # Both jobs run at once (4 logical CPUs, 2 workers each): one wait instead of two.
    jid = client.submit(QUICKSTART)
    sub = _fedray("submit", str(QUICKSTART), "--address", url, "--results-root", str(results))
    assert sub.returncode == 0, sub.stderr
    cli_jid = sub.stdout.strip().splitlines()[-1]
    assert cli_jid.startswith("fedray-quickstart-") and cli_jid != jid

    text = "".join(client.logs(jid, follow=True, poll_s=0.5))
    assert str(client.status(jid)) == "SUCCEEDED", text[-3000:]
    assert sum(f"round {r}/10: accuracy" in text for r in range(1, 11)) == 10  # one progress line per round

    res = client.result(jid)
    assert len(res.rounds) == 10 and res.final_accuracy > 0.5, res.summary  # chance is 0.1
    assert res.summary["codec"] == "int8" and res.summary["bytes_up_total"] < 0.3 * res.summary["bytes_up_fp32"]
    assert res.results_dir == str(results / jid)
    assert sorted(p.name for p in Path(res.results_dir).iterdir()) == sorted(RESULT_FILES)
    assert res.model is not None and set(res.model) and all(v.dtype.is_floating_point for v in res.model.values())
    # One id: Ray's submission id is the id the driver ran under, and its actors' names carry it
    # (`{job}:aggregator-{i}`, `{job}:worker-{i}`, no random suffix); their repr says job, role, shard.
    assert res.summary["job_id"] == jid
    # Ray's state API (what `ray list actors` and ray.util.state.list_actors read), over HTTP with the token.
    code, body = _get(f"{url}/api/v0/actors?detail=1&limit=10000", token=auth_token())
    assert code == 200, body[:500]
    actors = {a["name"]: a for a in json.loads(body)["data"]["result"]["result"]
              if (a.get("name") or "").startswith(f"{jid}:")}
    assert set(actors) == {f"{jid}:aggregator-0", f"{jid}:worker-0", f"{jid}:worker-1"}, sorted(actors)
    assert actors[f"{jid}:aggregator-0"]["repr_name"] == f"fedray job={jid} role=aggregator shard=0 of=1"
    assert actors[f"{jid}:worker-1"]["repr_name"] == f"fedray job={jid} role=worker index=1"

    # The other CLI commands in-process (the console script calls cli.main; a process each costs
    # seconds of imports on a busy 2-core machine). None of them calls ray.init: HTTP only.
    def fedray(*args: str) -> tuple[int, str]:
        rc = cli.main([*args, "--address", url])
        return rc, capsys.readouterr().out

    rc, out = fedray("logs", cli_jid, "--follow")
    assert rc == 0 and "round 10/10: accuracy" in out, out[-3000:]
    # It ends with the summary `fedray run` prints, not the FEDRAY_RESULT line of JSON.
    assert "  final accuracy " in out and "FEDRAY_RESULT" not in out, out[-3000:]
    assert fedray("status", cli_jid) == (0, "SUCCEEDED\n")
    out_json = tmp_path / "cli-result.json"
    rc, out = fedray("result", cli_jid, "--json", str(out_json))
    assert rc == 0 and "final accuracy" in out
    # Same seed, same spec: the two jobs learn the same model.
    assert json.loads(out_json.read_text())["final_accuracy"] == res.final_accuracy
    rc, out = fedray("stop", cli_jid)
    assert rc == 0 and "not running" in out
    assert fedray("status", "fedray-no-such-job")[0] == 1

    # The dashboard's Jobs view lists both; without the token the REST API refuses.
    code, body = _get(f"{url}/api/jobs/", token=auth_token())
    assert code == 200
    listed = {j.get("submission_id"): j for j in json.loads(body)}
    assert {jid, cli_jid} <= set(listed) and listed[jid]["status"] == "SUCCEEDED"
    assert listed[jid]["metadata"]["fedray_job"] == "quickstart"
    assert listed[cli_jid]["metadata"]["fedray_job_id"] == cli_jid
    if auth_token():
        assert _get(f"{url}/api/jobs/", token=None)[0] == 401
        with pytest.raises(ClientError, match="refused the token: pass the cluster's token"):
            Client(url, token="not-the-token")

    # The jobs' fedray_* metrics reach Ray's metrics port (with Ray's `ray_` prefix), through the
    # cluster's exporter actor (gauges outliving the job: tests/test_cluster.py).
    # Ray exports every 10 s: wait (bounded) until both jobs' last rounds are on the port.
    want = {"ray_fedray_rounds_total", "ray_fedray_clients_total", "ray_fedray_bytes_total"}
    deadline, names, rounds = time.monotonic() + 40, set(), []
    while time.monotonic() < deadline:
        page = _get(metrics_url, token=None)[1]
        names = {ln.split("{")[0] for ln in page.splitlines() if ln.startswith("ray_fedray_")}
        rounds = [ln for ln in page.splitlines() if ln.startswith("ray_fedray_rounds_total{")]
        if want <= names and sum(float(ln.rsplit(" ", 1)[1]) for ln in rounds) == 20.0:
            break
        time.sleep(2)
    assert want <= names, sorted(names)
    assert all('fl_job="quickstart"' in ln and "client" not in ln.lower() for ln in rounds), rounds
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in rounds) == 20.0, rounds  # 10 rounds, two jobs


@pytest.mark.slow
def test_bad_spec_is_rejected_before_submission(ray_head, tmp_path):
    url, _ = ray_head
    client = Client(url, results_root=str(tmp_path))
    before = len(client._jobs.list_jobs())
    with pytest.raises(SpecError, match=r"training\.rounds: must be an integer >= 1"):
        client.submit({"data": {"dataset": "digits"}, "training": {"rounds": 0}})
    with pytest.raises(SpecError, match=r"data\.dataset: must be one of fashion-mnist, digits"):
        client.submit({"data": {"dataset": "cifar"}})
    assert len(client._jobs.list_jobs()) == before


def test_cli_submit_rejects_bad_spec_without_a_cluster(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("compression: {codec: gzip9}\n")
    assert cli.main(["submit", str(bad), "--address", "http://127.0.0.1:9"]) == 2  # port 9: nothing listens
    err = capsys.readouterr().err
    assert "compression.codec" in err and "identity" in err and "int8" in err


def test_user_task_code_is_shipped_with_the_job(ray_head, tmp_path):
    """examples/custom_cnn submitted from a spec outside its folder: the cluster (started from
    this venv, where `cnn_task` is not importable) runs the user's task from the shipped code."""
    url, _ = ray_head
    cnn_dir = REPO / "examples" / "custom_cnn"
    probe = subprocess.run([sys.executable, "-c", "import cnn_task"], cwd=tmp_path, capture_output=True)
    assert probe.returncode != 0  # not installed where the head runs
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: cnn-submit\ntask: {target: 'cnn_task:FashionCNN', params: {num_clients: 8, per_client: 30, "
        "test_size: 300}}\ntraining: {rounds: 2, clients_per_round: 3, local_epochs: 1, batch_size: 10}\n"
        "resources: {num_workers: 1}\n")
    results = tmp_path / "results"
    sub = _fedray("submit", str(spec), "--address", url, "--code-dir", str(cnn_dir), "--results-root", str(results))
    assert sub.returncode == 0, sub.stderr
    jid = sub.stdout.strip().splitlines()[-1]
    client = Client(url, results_root=str(results))
    text = "".join(client.logs(jid, follow=True, poll_s=0.5))
    assert str(client.status(jid)) == "SUCCEEDED", text[-3000:]
    res = client.result(jid)
    assert len(res.rounds) == 2 and res.final_accuracy > 0.15, res.summary
    assert set(res.summary["final_metrics"]) >= {"accuracy", "loss"}
    # A target that does not import is refused before anything is submitted.
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {target: 'cnn_taskk:FashionCNN'}\n")
    out = _fedray("submit", str(bad), "--address", url, "--code-dir", str(cnn_dir))
    assert out.returncode == 2 and "task.target" in out.stderr and "cnn_taskk" in out.stderr, out.stderr
