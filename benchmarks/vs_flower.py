"""fedray against Flower 1.41's Ray simulation on the identical task, in one invocation.

The task (research/environment.md, "The peer to beat"): sklearn digits, MLP 64-64-10, 1,000
IID clients, 100 per round, 1 local epoch of SGD at lr 0.1 and batch 32, FedAvg, 2 CPUs.
fedray runs through its real path (`fedray demo`: Ray workers, int8 codec, uploads over the gRPC
aggregation service), with `--worker-reduce` (each worker call decodes its clients' int8 updates
and uploads one partial sum per shard; `--per-client-uploads` measures the per-client path)
and one worker actor (`--fedray-workers`, default 1: the round's 100 clients train as one batched
computation in one call while the second CPU runs the driver and the aggregation shard; two
workers on the two CPUs make four busy processes on two cores, and each worker call pays Ray's
and the upload's fixed costs; `--fedray-workers 2` measures that set-up);
Flower runs `benchmarks/flower_side.py` in its own venv (flwr pins ray 2.55 and protobuf<7,
which cannot share fedray's venv), twice: `flower` through its legacy
`start_simulation` (the faster of its two APIs here, and the one the ratio is taken against) and
`flower_message_api` through `run_simulation` with the Message API. The systems alternate
(the order reverses every repetition), `--reps` times.

Per system: steady-state client updates per second (rounds 2 onward: sum of clients over sum of
round wall time), first-round time, whole-process wall time, peak PSS of the whole process tree
(the driver and every descendant: Ray's gcs, raylet, workers; polled every 0.2 s from
/proc/<pid>/smaps_rollup), and centralized test accuracy after every round.

    python benchmarks/vs_flower.py --json benchmarks/results/vs_flower.json [--rounds 6] [--reps 2]

The Flower venv is made on first use at --flower-venv (default .bench-venv-flower):
`python3 -m venv`, then `pip install torch==2.13.0` (first, so that no CUDA build is pulled),
then `pip install 'flwr[simulation]==1.41.*' scikit-learn`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# System name -> Flower API. `flower` is Flower's fastest path here, the legacy start_simulation
# (VirtualClientEngineActorPool); its Message API (run_simulation) is slower on this task: its
# simulation loop scans every node's queue every 0.1 s (vce_api.add_messages_to_queue).
SYSTEMS = {"flower": "legacy", "flower_message_api": "message", "fedray": None}
TASK = dict(dataset="digits", clients=1000, clients_per_round=100, hidden="64", local_epochs=1, batch_size=32, lr=0.1)


def ensure_flower_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists():
        return py
    print(f"creating the Flower venv at {venv} (a few minutes)", flush=True)
    subprocess.run([sys.executable if _is_system_python() else "python3", "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["flwr[simulation]==1.41.*", "scikit-learn"], check=True)
    return py


def _is_system_python() -> bool:
    return sys.prefix == sys.base_prefix


# --- process-tree memory ------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ')' are fixed.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Polls the PSS sum of a process and all its descendants; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak, self.peak_procs = pid, interval, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree_pids(self.pid)
            total = sum(pss_bytes(p) for p in pids)
            if total > self.peak:
                self.peak, self.peak_procs = total, len(pids)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def run_monitored(cmd: list[str], log_path: Path, env: dict | None = None, timeout: float = 3600) -> dict:
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        mem = TreeMemory(p.pid)
        try:
            rc = p.wait(timeout=timeout)
        finally:
            mem.stop()
            _kill_group(p)
    return {"rc": rc, "process_wall_s": time.perf_counter() - t0, "peak_pss_bytes": mem.peak,
            "peak_processes": mem.peak_procs}


def _kill_group(p: subprocess.Popen) -> None:
    # Ray may leave workers behind the driver; they are in the driver's own session.
    try:
        os.killpg(p.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def code_state() -> dict:
    """The commit and a hash of the working-tree files on fedray's hot path (the tree may be dirty)."""
    import hashlib

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    files = ("workers/client.py", "workers/pool.py", "workers/batched.py", "workers/train.py",
             "orchestrator/engine.py", "orchestrator/service.py", "proto/serde.py")
    return {"git_head": head, "sha256_12": {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:12]
                                             for f in files if (REPO / f).exists()}}


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- the two systems ----------------------------------------------------------------------

def fedray_cmd(rounds: int, json_path: Path, extra: list[str], reduce: bool = True, workers: int = 1) -> list[str]:
    t = TASK
    extra = (["--worker-reduce"] if reduce else []) + ["--workers", str(workers)] + list(extra)
    return [sys.executable, "-m", "fedray.orchestrator.cli", "demo", "--dataset", t["dataset"],
            "--clients", str(t["clients"]), "--clients-per-round", str(t["clients_per_round"]),
            "--rounds", str(rounds), "--hidden", t["hidden"], "--local-epochs", str(t["local_epochs"]),
            "--batch-size", str(t["batch_size"]), "--lr", str(t["lr"]), "--codec", "int8", "--num-cpus", "2",
            "--quiet", "--json", str(json_path), *extra]


def flower_cmd(py: Path, rounds: int, json_path: Path, api: str) -> list[str]:
    t = TASK
    return [str(py), str(REPO / "benchmarks" / "flower_side.py"), "--api", api, "--rounds", str(rounds),
            "--clients", str(t["clients"]), "--clients-per-round", str(t["clients_per_round"]),
            "--hidden", t["hidden"], "--local-epochs", str(t["local_epochs"]), "--batch-size", str(t["batch_size"]),
            "--lr", str(t["lr"]), "--num-cpus", "2", "--cpus-per-client", "1", "--json", str(json_path)]


def rounds_of(system: str, out: dict) -> list[dict]:
    keys = ("round", "clients", "wall_s", "accuracy")
    return [{k: r[k] for k in keys} for r in out["rounds"]]


def summarize_run(rounds: list[dict], proc: dict) -> dict:
    steady = rounds[1:]
    clients = sum(r["clients"] for r in steady)
    wall = sum(r["wall_s"] for r in steady)
    return {
        "updates_per_s": clients / wall if wall > 0 else None,
        "first_round_s": rounds[0]["wall_s"],
        "process_wall_s": proc["process_wall_s"],
        "peak_pss_mib": proc["peak_pss_bytes"] / 2**20,
        "peak_processes": proc["peak_processes"],
        "accuracy": [r["accuracy"] for r in rounds],
        "round_wall_s": [r["wall_s"] for r in rounds],
        "clients": [r["clients"] for r in rounds],
    }


def aggregate(runs: list[dict]) -> dict:
    ups = [r["updates_per_s"] for r in runs if r["updates_per_s"]]
    return {
        "steady_updates_per_s": statistics.median(ups) if ups else None,
        "steady_updates_per_s_runs": ups,
        "first_round_s": statistics.median(r["first_round_s"] for r in runs),
        "peak_pss_mib": max(r["peak_pss_mib"] for r in runs),
        "final_accuracy": statistics.mean(r["accuracy"][-1] for r in runs),
        "accuracy_by_round": [statistics.mean(v) for v in zip(*(r["accuracy"] for r in runs))],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--flower-venv", default=str(REPO / ".bench-venv-flower"))
    ap.add_argument("--only", choices=list(SYSTEMS), default=None, help="run one system only")
    ap.add_argument("--no-message-api", action="store_true",
                    help="skip Flower's Message API run (flower_message_api); the ratio is against `flower` anyway")
    ap.add_argument("--fedray-arg", action="append", default=[],
                    help="extra `fedray demo` argument (repeat), e.g. --fedray-arg=--clients-per-call=50")
    ap.add_argument("--fedray-workers", type=int, default=1,
                    help="fedray's worker actors (`fedray demo --workers`; default 1, see the module docstring)")
    ap.add_argument("--per-client-uploads", action="store_true",
                    help="fedray without --worker-reduce: every client's update is uploaded on its own")
    a = ap.parse_args(argv)
    systems = [s for s in SYSTEMS if a.only in (None, s) and not (a.no_message_api and s == "flower_message_api")]
    py = ensure_flower_venv(Path(a.flower_venv)) if any(s.startswith("flower") for s in systems) else None
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    commands: dict[str, str] = {}
    loads = []
    code_before = code_state()
    with tempfile.TemporaryDirectory(prefix="vs_flower_") as tmp:
        for rep in range(a.reps):
            order = systems if rep % 2 == 0 else systems[::-1]  # alternate who goes first
            for s in order:
                out = Path(tmp) / f"{s}-{rep}.json"
                cmd = fedray_cmd(a.rounds, out, a.fedray_arg, not a.per_client_uploads, a.fedray_workers) if s == "fedray" else flower_cmd(py, a.rounds, out, SYSTEMS[s])
                commands[s] = shlex.join(cmd).replace(tmp, "OUT").replace(str(REPO) + "/", "")
                before = load()
                print(f"[rep {rep + 1}/{a.reps}] {s}: running (load {before})", flush=True)
                proc = run_monitored(cmd, Path(tmp) / f"{s}-{rep}.log", env=env)
                if proc["rc"] != 0 or not out.exists():
                    print((Path(tmp) / f"{s}-{rep}.log").read_text()[-4000:], file=sys.stderr)
                    raise SystemExit(f"{s} failed (rc {proc['rc']})")
                res = summarize_run(rounds_of(s, json.loads(out.read_text())), proc)
                res["load_before"], res["load_after"] = before, load()
                loads.append(res["load_after"])
                runs[s].append(res)
                print(f"  {s}: {res['updates_per_s']:.0f} updates/s steady, first round {res['first_round_s']:.1f}s, "
                      f"peak PSS {res['peak_pss_mib']:.0f} MiB, accuracy {res['accuracy'][-1]:.4f}", flush=True)
    for s in runs:
        runs_meta = {"api": SYSTEMS[s]} if SYSTEMS[s] else {"path": "fedray demo (Ray workers, int8, gRPC service)",
                                                        "worker_reduce": not a.per_client_uploads,
                                                        "workers": a.fedray_workers}
        runs_meta.update(aggregate(runs[s]))
        runs[s] = runs_meta  # type: ignore[assignment]
    result = {
        "task": {**TASK, "rounds": a.rounds, "model": "MLP 64-64-10", "aggregation": "FedAvg", "cpus": 2,
                 "fedray_codec": "int8"},
        "systems": runs,
        "commands": [f"python {' '.join(shlex.quote(x) for x in sys.argv)}"] + [f"{k}: {v}" for k, v in commands.items()],
        "load": {"uptime_loadavg_after_each_run": loads, "cpu_count": os.cpu_count()},
        "code": code_before,
    }
    if "flower" in runs and "fedray" in runs:
        f, r = result["systems"]["flower"], result["systems"]["fedray"]
        result["ratio"] = r["steady_updates_per_s"] / f["steady_updates_per_s"]
        result["accuracy_gap_final"] = r["final_accuracy"] - f["final_accuracy"]
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k in ("ratio", "accuracy_gap_final", "load")}))
    print(f"written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
