"""A million-client population, 10,000 clients a round, on this machine.

    python benchmarks/scale.py --json benchmarks/results/scale.json

Runs the real path (Ray worker actors, int8 updates streamed to the gRPC aggregation service)
with client state in compact arrays: device profiles (`orchestrator/population.py`, over-selection
1.3x and the first K finishers in virtual time) and a seeded partition (each client 8 examples of
sklearn digits, regenerated from a hash of (seed, client)). Writes per round: wall and virtual
seconds, clients; and the peak RSS of the driver and the peak PSS of the whole process tree (the
driver, Ray's gcs_server and raylet, every worker), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from fedray.orchestrator.engine import ensure_ray, run_job
from fedray.orchestrator.spec import DataSpec, JobSpec, ModelSpec, PopulationSpec, ResourceSpec, TrainingSpec


def _tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc/*/stat parent ids."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryWatch:
    """Peak driver RSS and peak PSS summed over the driver and all its descendants."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.me = os.getpid()
        self.peak_driver_rss = self.peak_tree_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(every_s,), daemon=True)

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak_driver_rss = max(self.peak_driver_rss, _rss(self.me))
            pids = _tree(self.me)
            self.peak_tree_pss = max(self.peak_tree_pss, sum(_pss(p) for p in pids))

    def __enter__(self) -> "MemoryWatch":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--clients", type=int, default=1_000_000)
    p.add_argument("--per-round", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples-per-client", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=None)
    a = p.parse_args(argv)
    spec = JobSpec(
        name="scale", seed=0,
        data=DataSpec(dataset="digits", num_clients=a.clients, examples_per_client=a.examples_per_client),
        model=ModelSpec(hidden=(64,)),
        training=TrainingSpec(rounds=a.rounds, clients_per_round=a.per_round, local_epochs=1, batch_size=32, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=100),
        population=PopulationSpec(over_select=1.3, deadline_s=a.deadline_s),
    )
    started = ensure_ray(2)
    t0 = time.perf_counter()
    try:
        with MemoryWatch() as mem:
            res = run_job(spec, progress=True, log=print)
    finally:
        if started:
            import ray

            ray.shutdown()
    out = {
        "clients": a.clients, "per_round": a.per_round,
        "rounds": [{"round": r.round, "clients": r.clients, "wall_s": r.wall_s, "virtual_s": r.virtual_s,
                    "accuracy": r.accuracy, "clients_per_s": r.clients / r.wall_s} for r in res.rounds],
        "rounds_completed": len(res.rounds),
        "peak_driver_rss_bytes": mem.peak_driver_rss, "peak_tree_pss_bytes": mem.peak_tree_pss,
        "memory_bound_bytes": 6 << 30, "within_bound": mem.peak_tree_pss < (6 << 30),
        "total_s": time.perf_counter() - t0, "load": os.getloadavg(),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
