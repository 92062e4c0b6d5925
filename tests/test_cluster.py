"""`fedray cluster up`, `fedray submit`, `fedray cluster down` as the README's tour types them, and
monitoring with a real Prometheus (Debian's package) that finds Ray's metrics ports through the
service-discovery file Ray writes, scraping every second. Every panel query of the shipped Grafana
dashboard is evaluated through Prometheus's HTTP API and must return data for the job; the job's
last gauge values must still be there after its driver has exited.

Everything is this module's own: the head (its own --temp-dir, free ports on 127.0.0.1), stopped
by `fedray cluster down` (by process id; never `ray stop`), and Prometheus, stopped by its pid.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_submit import _free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD = REPO / "helm" / "fedray" / "files" / "grafana-dashboard.json"
JOB_NAME = "monitored"
ROUNDS = 5
JOB = {
    "name": JOB_NAME, "seed": 1,
    "data": {"dataset": "digits", "num_clients": 40},
    "model": {"kind": "mlp", "hidden": [32]},
    "training": {"rounds": ROUNDS, "clients_per_round": 8, "local_epochs": 1, "batch_size": 16, "lr": 0.2},
    "compression": {"codec": "int8"},
    "resources": {"num_workers": 1, "clients_per_call": 8},
    # Rounds of digits take 0.05 s: each round also waits 1.5 s for a real client that never comes,
    # so the counters grow over several 1 s scrapes and the rate() panels have something to show.
    "service": {"real_clients": 1, "real_client_wait_s": 1.5},
}


def _fedray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # Ray reports metrics to its export port every 10 s by default; every second here.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_metrics_report_interval_ms": "1000"}
    return subprocess.run([str(BIN / "fedray"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="frc", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, metrics = _free_ports(3)
    up = _fedray("cluster", "up", "--temp-dir", temp, "--port", str(gcs), "--dashboard-port", str(dash),
                 "--metrics-port", str(metrics), "--num-cpus", "2")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{dash}" in up.stdout and "fedray cluster down" in up.stdout
        state = json.loads((Path(temp) / "fedray-cluster.json").read_text())
        assert _alive(state["pid"])
        yield {"temp": temp, "url": f"http://127.0.0.1:{dash}", "metrics_port": metrics, **state}
    finally:
        _fedray("cluster", "down", "--temp-dir", temp)  # a no-op when the last test stopped it
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(head, tmp_path_factory):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("Debian's prometheus is not installed (scripts/setup.sh test installs it with apt-get)")
    folder = tmp_path_factory.mktemp("prometheus")
    (port,) = _free_ports(1)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "ray",
            "file_sd_configs": [{"files": [head["service_discovery_file"]], "refresh_interval": "1s"}],
        }],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(folder / "prometheus.log", "w")
    proc = subprocess.Popen(
        [exe, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus was not ready in 30 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _query(prom: str, expr: str, **params) -> list[dict]:
    path = "query_range" if "start" in params else "query"
    qs = urllib.parse.urlencode({"query": expr, **params})
    with urllib.request.urlopen(f"{prom}/api/v1/{path}?{qs}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def _grafana(expr: str) -> str:
    """The query as Grafana sends it with the job picked and a 15 s scrape interval's rate window."""
    return expr.replace("$fl_job", JOB_NAME).replace("$__rate_interval", "1m")


def test_submitted_job_is_scraped_and_every_dashboard_panel_has_data(head, prometheus, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(JOB))
    url = head["url"]
    t_start = time.time()
    sub = _fedray("submit", str(spec), "--address", url, "--results-root", str(tmp_path / "results"))
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    logs = _fedray("logs", job_id, "--follow", "--address", url)
    assert logs.returncode == 0 and f"round {ROUNDS}/{ROUNDS}: accuracy" in logs.stdout, logs.stdout[-3000:]
    st = _fedray("status", job_id, "--address", url)
    assert st.stdout.strip() == "SUCCEEDED", st.stdout + st.stderr
    res = _fedray("result", job_id, "--address", url, "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    final_acc = json.loads((tmp_path / "r.json").read_text())["final_accuracy"]
    t_end = time.time()

    # The driver has exited; the last values must be scraped after that (1 s scrapes), and stay.
    want = f'ray_fedray_round{{fl_job="{JOB_NAME}"}}'
    deadline, rows = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        rows = _query(prometheus, f"timestamp({want})")
        if rows and float(rows[0]["value"][1]) > t_end + 2:
            break
        time.sleep(1)
    assert rows and float(rows[0]["value"][1]) > t_end + 2, (rows, t_end)
    assert [float(r["value"][1]) for r in _query(prometheus, want)] == [ROUNDS]
    acc = _query(prometheus, f'ray_fedray_accuracy{{fl_job="{JOB_NAME}"}}')
    assert len(acc) == 1 and float(acc[0]["value"][1]) == pytest.approx(final_acc, abs=1e-9)

    # Every panel query: data now (after the job) and a non-zero value while the job ran.
    queries = _panel_queries()
    assert len(queries) >= 10
    empty, flat = [], []
    for title, expr in queries:
        q = _grafana(expr)
        if not _query(prometheus, q):
            empty.append((title, q))
        series = _query(prometheus, q, start=f"{t_start:.3f}", end=f"{time.time():.3f}", step="1")
        values = [float(v) for s in series for _, v in s["values"]]
        if not any(math.isfinite(v) and v > 0 for v in values):
            flat.append((title, q))
    assert not empty, f"panel queries with no data after the job: {empty}"
    assert not flat, f"panel queries never above zero during the job: {flat}"
    ratio = float(_query(prometheus, _grafana('avg (ray_fedray_compression_ratio{fl_job=~"$fl_job"})'))[0]["value"][1])
    assert 3.5 < ratio < 4.1  # int8 against fp32


def test_cluster_down_stops_only_this_head(head):
    pid = head["pid"]
    down = _fedray("cluster", "down", "--temp-dir", head["temp"])
    assert down.returncode == 0 and f"stopped the Ray head (pid {pid}" in down.stdout, down.stdout + down.stderr
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    leftover = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if head["temp"].encode() in (d / "cmdline").read_bytes():
                    leftover.append(int(d.name))
            except OSError:
                pass
    assert not leftover, f"processes of this head still running: {leftover}"
    assert not (Path(head["temp"]) / "fedray-cluster.json").exists()
    again = _fedray("cluster", "down", "--temp-dir", head["temp"])
    assert again.returncode == 0 and "nothing to stop" in again.stdout


def test_version_and_busy_port_errors(tmp_path, capsys):
    from fedray.orchestrator import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fedray 0.")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        gcs, metrics = _free_ports(2)
        rc = cli.main(["cluster", "up", "--temp-dir", str(tmp_path), "--dashboard-port", str(port),
                       "--port", str(gcs), "--metrics-port", str(metrics)])
    err = capsys.readouterr().err
    assert rc == 1 and f"port {port} on 127.0.0.1 is in use" in err and "--dashboard-port" in err
    assert not (tmp_path / "fedray-cluster.json").exists()
    assert "nothing to stop" in _fedray("cluster", "down", "--temp-dir", str(tmp_path)).stdout
