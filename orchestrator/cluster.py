"""`fedray cluster up` / `fedray cluster down`: a local Ray head from fedray's own environment.

`up` runs this environment's `ray start --head --block` (so jobs' `python` is the one with torch
and fedray) in a process session of its own, with its own --temp-dir, every port on 127.0.0.1, the
dashboard on 8265 (what `fedray submit` uses by default) and the metrics export port on 8080. It
records the head's process id in <temp dir>/fedray-cluster.json and returns once the dashboard
answers. `down` stops that head and nothing else: the processes of its session plus the workers
whose raylet is one of them, SIGTERM then SIGKILL. It never runs `ray stop`, which would end every
Ray on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ClusterError", "ClusterInfo", "add_parser", "cluster_down", "cluster_up", "main"]

DEFAULT_TEMP_DIR = "/tmp/fedray-cluster"  # short: Ray's socket paths must stay under 108 characters
STATE_FILE = "fedray-cluster.json"


class ClusterError(RuntimeError):
    """The local head could not be started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class ClusterInfo:
    pid: int  # of `ray start --block`, also its process group and session id
    temp_dir: str
    dashboard_url: str
    metrics_url: str
    gcs_address: str
    service_discovery_file: str  # Prometheus file_sd targets, written by Ray

    def describe(self) -> str:
        return (f"Ray head up (pid {self.pid}), started from {Path(sys.executable).parent / 'ray'}\n"
                f"  dashboard   {self.dashboard_url}   (fedray submit/logs/result use it by default)\n"
                f"  metrics     {self.metrics_url}\n"
                f"  Prometheus  file_sd_configs: {self.service_discovery_file}\n"
                f"  log         {Path(self.temp_dir) / 'ray-start.log'}\n"
                f"stop it with: fedray cluster down")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _state_path(temp_dir: str) -> Path:
    return Path(temp_dir) / STATE_FILE


def _read_state(temp_dir: str) -> ClusterInfo | None:
    p = _state_path(temp_dir)
    if not p.is_file():
        return None
    return ClusterInfo(**json.loads(p.read_text()))


def _is_our_head(info: ClusterInfo) -> bool:
    """The recorded pid is still our `ray start` (a pid can be reused after a reboot or a crash)."""
    try:
        cmd = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"start" in cmd and any(a == f"--temp-dir={info.temp_dir}".encode() for a in cmd)


def cluster_up(*, temp_dir: str = DEFAULT_TEMP_DIR, port: int = 6379, dashboard_port: int = 8265,
               metrics_port: int = 8080, num_cpus: int | None = None, timeout_s: float = 120.0) -> ClusterInfo:
    """Start the head and wait until its dashboard answers.

    Raises:
        ClusterError: a head recorded in temp_dir is still running, or the head did not come up
            within timeout_s (the message holds the end of its log).
    """
    from .client import auth_token

    old = _read_state(temp_dir)
    if old is not None and _is_our_head(old):
        raise ClusterError(f"a fedray cluster is already up (pid {old.pid}, {old.dashboard_url}); "
                           f"run `fedray cluster down` first")
    for flag, p in (("--port", port), ("--dashboard-port", dashboard_port), ("--metrics-port", metrics_port)):
        if not _port_free(p):
            raise ClusterError(f"port {p} on 127.0.0.1 is in use (another Ray head?); pick another with {flag}")
    tmp = Path(temp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        raise ClusterError(f"{ray_bin} not found: install fedray (and with it ray) into this environment")
    cmd = [str(ray_bin), "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={tmp}",
           "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--metrics-export-port={metrics_port}", "--include-dashboard=true",
           # internal ports: free ones, so two heads on one machine never collide
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # jobs' `python`
    log_path = tmp / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    info = ClusterInfo(
        pid=proc.pid, temp_dir=str(tmp), dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", gcs_address=f"127.0.0.1:{port}",
        service_discovery_file=str(tmp / "prom_metrics_service_discovery.json"),
    )
    _state_path(temp_dir).write_text(json.dumps(asdict(info), indent=2))
    tok = auth_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            _state_path(temp_dir).unlink(missing_ok=True)
            raise ClusterError(f"`ray start` exited with {proc.returncode}; the end of {log_path}:\n"
                               f"{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{info.dashboard_url}/api/version", headers=headers),
                                        timeout=5) as r:
                if r.status == 200:
                    return info
        except (OSError, urllib.error.HTTPError):
            pass
        if time.monotonic() > deadline:
            _stop(info)
            raise ClusterError(f"the Ray head did not answer on {info.dashboard_url} within {timeout_s:.0f} s; "
                               f"it was stopped. The end of {log_path}:\n{log_path.read_text()[-2000:]}")
        time.sleep(1)


def _head_pids(pgid: int) -> set[int]:
    """The head's processes: its process group, plus the workers its raylet started (they move to
    process groups of their own but carry RAY_RAYLET_PID)."""
    group, raylets, by_raylet = set(), set(), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) == pgid:
                group.add(int(d.name))
                if b"raylet/raylet" in (d / "cmdline").read_bytes():
                    raylets.add(d.name)
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        for kv in env:
            if kv.startswith(b"RAY_RAYLET_PID="):
                by_raylet[int(d.name)] = kv.split(b"=", 1)[1].decode()
    return group | {pid for pid, r in by_raylet.items() if r in raylets}


def _signal(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop(info: ClusterInfo, grace_s: float = 5.0) -> int:
    pids = _head_pids(info.pid)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    _signal(pids | _head_pids(info.pid), signal.SIGKILL)  # gcs_server and raylet outlive SIGTERM
    try:
        os.waitpid(info.pid, 0)  # reap it when this process started it
    except ChildProcessError:
        pass
    return len(pids)


def cluster_down(*, temp_dir: str = DEFAULT_TEMP_DIR) -> str:
    """Stop the head recorded in temp_dir; returns what was done, in a sentence."""
    info = _read_state(temp_dir)
    if info is None:
        return f"no fedray cluster is recorded in {temp_dir}; nothing to stop"
    if not _is_our_head(info):
        _state_path(temp_dir).unlink(missing_ok=True)
        return f"the Ray head recorded in {temp_dir} (pid {info.pid}) is no longer running"
    n = _stop(info)
    _state_path(temp_dir).unlink(missing_ok=True)
    return f"stopped the Ray head (pid {info.pid}, {n} processes)"


def add_parser(sub) -> None:
    p = sub.add_parser("cluster", help="start or stop a local Ray head from fedray's own environment",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", choices=["up", "down"], help="up: start a local Ray head from this environment; down: stop the one up started")
    p.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR, help="Ray's temp dir; also where the head is recorded")
    p.add_argument("--port", type=int, default=6379, help="GCS port (up)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Job Submission API port (up)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics export port (up)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (up; None: all of them)")


def main(a: argparse.Namespace) -> int:
    try:
        if a.action == "up":
            info = cluster_up(temp_dir=a.temp_dir, port=a.port, dashboard_port=a.dashboard_port,
                              metrics_port=a.metrics_port, num_cpus=a.num_cpus)
            print(info.describe())
        else:
            print(cluster_down(temp_dir=a.temp_dir))
        return 0
    except ClusterError as e:
        print(f"fedray: error: {e}", file=sys.stderr)
        return 1
