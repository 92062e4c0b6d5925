"""A population of up to a billion clients, 10,000 a round, on this machine.

    python benchmarks/scale.py --clients 1000000000 --json benchmarks/results/scale_1b.json

Runs the real path (Ray worker actors, int8 updates streamed to the gRPC aggregation service)
with nothing stored per client: device profiles and availability derived from (seed, client id)
by counter-based hashing (`orchestrator/population.py`, over-selection 1.3x along a seeded
permutation of all ids, the first K finishers in virtual time) and a seeded partition (each
client 8 examples of sklearn digits, from a hash of (seed, client)). In the same invocation it
runs the same job on a reference population (`--reference-clients`, default 1,000,000),
alternating the two `--reps` times, and reports the ratio of their median round times.

Writes per run and round: wall and virtual seconds, clients; per run the peak RSS of the driver
and the peak PSS of the whole process tree (the driver, Ray's gcs_server and raylet, every
worker), sampled every 0.2 s; the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def _spec(a, clients: int) -> JobSpec:
    return JobSpec(
        name="scale", seed=0,
        data=DataSpec(dataset="digits", num_clients=clients, examples_per_client=a.examples_per_client),
        model=ModelSpec(hidden=(64,)),
        training=TrainingSpec(rounds=a.rounds, clients_per_round=a.per_round, local_epochs=1, batch_size=32, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=100),
        population=PopulationSpec(over_select=1.3, deadline_s=a.deadline_s),
    )


def _run(a, clients: int) -> dict:
    load0, t0 = os.getloadavg(), time.perf_counter()
    with MemoryWatch() as mem:
        res = run_job(_spec(a, clients), progress=False, log=lambda m: None)
    out = {
        "clients": clients, "per_round": a.per_round,
        "rounds": [{"round": r.round, "clients": r.clients, "wall_s": r.wall_s, "virtual_s": r.virtual_s,
                    "accuracy": r.accuracy, "clients_per_s": r.clients / r.wall_s} for r in res.rounds],
        "rounds_completed": len(res.rounds),
        "peak_driver_rss_bytes": mem.peak_driver_rss, "peak_tree_pss_bytes": mem.peak_tree_pss,
        "total_s": time.perf_counter() - t0, "load_before": load0, "load_after": os.getloadavg(),
    }
    walls = ", ".join(f"{r['wall_s']:.2f}" for r in out["rounds"])
    print(f"{clients:>13,} clients: rounds {walls} s, peak tree PSS {mem.peak_tree_pss / 2**30:.2f} GiB, "
          f"driver RSS {mem.peak_driver_rss / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--clients", type=int, default=1_000_000)
    p.add_argument("--reference-clients", type=int, default=1_000_000,
                   help="also run this population size in the same invocation (0: none)")
    p.add_argument("--reps", type=int, default=1, help="alternating repetitions of each run")
    p.add_argument("--per-round", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples-per-client", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--memory-bound-gib", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.clients < 1 or a.reps < 1:
        p.error("--clients and --reps must be >= 1")
    with_ref = bool(a.reference_clients) and a.reference_clients != a.clients
    started = ensure_ray(2)
    runs: dict[int, list[dict]] = {a.clients: [], a.reference_clients: []}
    t0 = time.perf_counter()
    try:
        for rep in range(a.reps):  # alternating: ref, big, big, ref, ...
            order = [a.reference_clients, a.clients] if with_ref else [a.clients]
            for n in (order if rep % 2 == 0 else order[::-1]):
                runs[n].append(_run(a, n))
    finally:
        if started:
            import ray

            ray.shutdown()

    def median_wall(rs: list[dict]) -> float:
        return statistics.median(r["wall_s"] for run in rs for r in run["rounds"])

    main_runs = runs[a.clients]
    bound = int(a.memory_bound_gib * 2**30)
    peak = max(r["peak_tree_pss_bytes"] for r in main_runs)
    out = {
        # The figures of the first run at --clients (the fields), then every run.
        "clients": a.clients, "per_round": a.per_round,
        "rounds": main_runs[0]["rounds"],
        "rounds_completed": min(r["rounds_completed"] for r in main_runs),
        "peak_driver_rss_bytes": max(r["peak_driver_rss_bytes"] for r in main_runs),
        "peak_tree_pss_bytes": peak,
        "memory_bound_bytes": bound, "within_bound": peak <= bound,
        "median_round_wall_s": median_wall(main_runs),
        "runs": main_runs,
    }
    if with_ref:
        ref = median_wall(runs[a.reference_clients])
        out["reference"] = {"clients": a.reference_clients, "median_round_wall_s": ref,
                            "peak_tree_pss_bytes": max(r["peak_tree_pss_bytes"] for r in runs[a.reference_clients]),
                            "runs": runs[a.reference_clients]}
        out["round_time_ratio"] = out["median_round_wall_s"] / ref
        out["round_time_ratio_bound"] = 1.2
        out["within_round_time_bound"] = out["round_time_ratio"] <= 1.2
    out |= {
        "total_s": time.perf_counter() - t0, "load": os.getloadavg(), "cpus": os.cpu_count(),
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"{a.clients:,} clients: median round {out['median_round_wall_s']:.2f} s, peak tree PSS "
          f"{peak / 2**30:.2f} GiB (bound {a.memory_bound_gib} GiB: {'met' if out['within_bound'] else 'MISSED'})")
    if with_ref:
        print(f"{a.reference_clients:,} clients: median round {out['reference']['median_round_wall_s']:.2f} s; ratio "
              f"{out['round_time_ratio']:.2f} (bound 1.2: {'met' if out['within_round_time_bound'] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
