"""Chaos benchmark: a job keeps its result while worker actors, an aggregation shard and the
driver itself are killed.

    python benchmarks/chaos.py --json benchmarks/results/chaos.json

In one invocation: a fault-free run, then the same job (same seed) while a killer thread kills a
random worker actor every --kill-every seconds, shard 1 is killed once (after round 3), and the
driver (a child process attached to the same Ray cluster) is SIGKILLed once its round
--driver-kill-round checkpoint lands; the job then resumes from that checkpoint in this process,
with the killer still running. Writes rounds_completed, kills, updates_lost,
updates_double_counted and max_abs_diff_vs_fault_free.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

from fedray.orchestrator.engine import ensure_ray, run_job
from fedray.orchestrator.spec import DataSpec, JobSpec, ResourceSpec, TrainingSpec


def make_spec(a: argparse.Namespace, checkpoint_dir: str | None) -> JobSpec:
    return JobSpec(
        name="chaos", seed=a.seed,
        data=DataSpec(dataset="digits", num_clients=a.clients),
        training=TrainingSpec(rounds=a.rounds, clients_per_round=a.per_round, local_epochs=2, batch_size=16, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=2, shards=2, max_attempts=50),
        checkpoint_dir=checkpoint_dir,
    )


class Killer:
    """Kills a random started worker actor every `every_s` s; shard 1 once after round 3."""

    def __init__(self, every_s: float, seed: int, count_file: Path) -> None:
        self.every_s, self.rng, self.count_file = every_s, np.random.default_rng(seed), count_file
        self.rt, self.stop = None, threading.Event()
        self.worker_kills = self.shard_kills = 0
        self.kill_shard_after = 3

    def start(self, rt) -> None:
        self.rt = rt
        threading.Thread(target=self._loop, daemon=True).start()

    def _record(self) -> None:
        self.count_file.write_text(json.dumps({"worker": self.worker_kills, "shard": self.shard_kills}))

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            pool = self.rt.pool
            if pool is None or not pool.actors:
                continue
            victim = pool.actors[int(self.rng.integers(len(pool.actors)))]
            try:  # only a started actor: killing replacements during start-up would starve the job
                ray.get(victim.ping.remote(), timeout=30)
            except Exception:
                continue
            ray.kill(victim, no_restart=True)
            self.worker_kills += 1
            self._record()

    def on_round(self, rec) -> None:
        if rec.round == self.kill_shard_after and self.shard_kills == 0:
            ray.kill(self.rt.shards.actors[1], no_restart=True)
            self.shard_kills += 1
            self._record()


def _child(address: str, args: dict, checkpoint_dir: str, count_file: str) -> None:
    """The first driver: runs the job with faults until the parent SIGKILLs it."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(address=address, logging_level="WARNING")
    a = argparse.Namespace(**args)
    k = Killer(a.kill_every, a.seed, Path(count_file))
    run_job(make_spec(a, checkpoint_dir), progress=False, log=lambda s: None, on_start=k.start, on_round=k.on_round)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--clients", type=int, default=400)
    p.add_argument("--per-round", type=int, default=40)
    p.add_argument("--kill-every", type=float, default=0.25)
    p.add_argument("--driver-kill-round", type=int, default=8)
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args(argv)
    started = ensure_ray(2)
    t0 = time.time()
    try:
        clean = run_job(make_spec(a, None), progress=False, log=lambda s: None)
        print(f"fault-free run: {len(clean.rounds)} rounds, accuracy {clean.final_accuracy:.4f}", flush=True)
        with tempfile.TemporaryDirectory() as ck:
            counts = Path(ck) / "kills-child.json"
            ctx = mp.get_context("spawn")
            child = ctx.Process(target=_child, args=(ray.get_runtime_context().gcs_address, vars(a), ck, str(counts)))
            child.start()
            target = Path(ck) / f"round-{a.driver_kill_round:06d}.pt"
            while not target.exists() and child.is_alive():
                time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            print(f"driver killed after round {a.driver_kill_round}", flush=True)
            child_kills = json.loads(counts.read_text()) if counts.exists() else {"worker": 0, "shard": 0}
            k = Killer(a.kill_every, a.seed + 1, Path(ck) / "kills-parent.json")
            k.kill_shard_after = 10**9  # the shard was killed once already, by the first driver
            try:
                faulty = run_job(make_spec(a, ck), progress=False, log=lambda s: None, resume=True,
                                 on_start=k.start, on_round=k.on_round)
            finally:
                k.stop.set()
    finally:
        if started:
            ray.shutdown()
    per_round = a.per_round
    lost = sum(max(0, per_round - r.clients) for r in faulty.rounds)
    double = sum(max(0, r.clients - per_round) for r in faulty.rounds)
    diff = max(float((faulty.params[n] - clean.params[n]).abs().max()) for n in clean.params)
    out = {
        "rounds_completed": len(faulty.rounds),
        "rounds": a.rounds,
        "kills": child_kills["worker"] + child_kills["shard"] + k.worker_kills + 1,  # + 1: the driver
        "worker_kills": child_kills["worker"] + k.worker_kills,
        "shard_kills": child_kills["shard"],
        "driver_kills": 1,
        "updates_lost": lost,
        "updates_double_counted": double,
        "max_abs_diff_vs_fault_free": diff,
        "bit_identical": all(torch.equal(faulty.params[n], clean.params[n]) for n in clean.params),
        "final_accuracy": faulty.final_accuracy,
        "fault_free_accuracy": clean.final_accuracy,
        "wall_s": time.time() - t0,
        "command": "python benchmarks/chaos.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
