"""A 100M-parameter transformer through the whole system: memory is O(model), not O(clients x model).

    python benchmarks/big_model.py --json benchmarks/results/big_model.json [--rounds 3] [--clients 2 4]
        [--max-inflight 2]

Runs fedray's real path (`run_job`: Ray worker actors, the gRPC aggregation shard actor, int8
uploads, a P2U broadcast) on `lm_task.LMTask`, a decoder-only transformer of 106.8M parameters
(random init, 64-token sequences, one SGD step per client), once per entry of --clients (clients
per round), and first once on a tiny transformer of the same shape family, whose shard peak is
the fixed overhead (a Ray actor process with torch, grpc and fedray loaded). The shard admits
--max-inflight uploads at once (`service.max_inflight`): each holds its int8 bytes (0.25x fp32)
until it commits, so that, not the clients per round, bounds what uploads add to the shard.

Measured per job: the shard actor's and the worker actors' peak RSS (VmHWM of their processes,
read after every round; each job starts fresh actors), the driver's peak RSS (VmHWM of this
process, reset at the start of each job via /proc/self/clear_refs), the object store's peak use
(sampled from Ray's memory summary), per-round wall time, bytes up and down, and the P2U stages.
Then, on the 100M model's weights: P2U encode / decode time and the time to the first usable
model (stage 0 received and decoded) at 10 and 100 Mbit/s against a one-shot fp32 send.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import ray  # noqa: F401  (first: Ray puts its bundled psutil on the import path)
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_task import LMTask, num_params  # noqa: E402

BIG = dict(vocab=256, d=768, layers=15, heads=12, seq_len=64)
TINY = dict(vocab=256, d=128, layers=4, heads=4, seq_len=64)  # about 0.85M parameters
P2U = {"stage_bits": [4, 4, 8]}
MBIT = 1e6 / 8  # bytes per second at 1 Mbit/s


def _hwm(pid: int) -> int:
    """A process's peak resident set size in bytes (VmHWM), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_own_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ray_processes(marker: str) -> list[int]:
    """PIDs of this driver's Ray processes whose title names `marker` (Ray sets the actor
    process title to `ray::<Class>...`); only descendants of this process, so other Ray
    instances on the machine are not counted."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _object_store_used() -> int:
    """Bytes in the connected cluster's object store now (Ray's memory summary, stats only)."""
    import ray
    from ray._private.internal_api import memory_summary

    s = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", s)
    return int(m.group(1)) << 20 if m else 0


def _rss(pid: int) -> tuple[int, int]:
    """(resident set size, the part of it that is shared memory: Ray's object store pages)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssShmem:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out.get("VmRSS", 0), out.get("RssShmem", 0)


class _Sampler(threading.Thread):
    """Every `interval` s: the RSS of this driver and of the shard actor (found by its process
    title once it starts), and every 4th time the object store's use; keeps the peaks and a
    timeline of (seconds, shard RSS, driver RSS, store) to show when memory is taken."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self._halt, self.t0 = interval, threading.Event(), time.perf_counter()
        self.store_peak, self.store_samples, self.shard_pid, self.timeline = 0, 0, None, []
        self.private_peak = {"shard": 0, "driver": 0}  # sampled peak of RSS less shared memory

    def run(self) -> None:
        i, store = 0, 0
        while not self._halt.wait(self.interval) and i < 100_000:
            if self.shard_pid is None or not psutil.pid_exists(self.shard_pid):
                found = _ray_processes("AggregationShard")
                self.shard_pid = found[0] if found else None
            if i % 4 == 0:
                try:
                    store = _object_store_used()
                    self.store_peak, self.store_samples = max(self.store_peak, store), self.store_samples + 1
                except Exception:  # the node is shutting down
                    pass
            shard, shard_shm = _rss(self.shard_pid) if self.shard_pid else (0, 0)
            driver, driver_shm = _rss(os.getpid())
            self.private_peak["shard"] = max(self.private_peak["shard"], shard - shard_shm)
            self.private_peak["driver"] = max(self.private_peak["driver"], driver - driver_shm)
            self.timeline.append((round(time.perf_counter() - self.t0, 2), shard >> 20, shard_shm >> 20,
                                  driver >> 20, driver_shm >> 20, store >> 20))
            i += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def job_spec(*, clients: int, rounds: int, workers: int, batch: int, seed: int, max_inflight: int = 2) -> dict:
    return {
        "name": "big-model", "seed": seed,
        "training": {"rounds": rounds, "clients_per_round": clients, "local_epochs": 1, "batch_size": batch,
                     "lr": 0.05},
        "compression": {"codec": "int8", "broadcast": "p2u", "broadcast_params": P2U},
        "resources": {"num_workers": workers, "shards": 1},
        "service": {"max_inflight": max_inflight},
    }


def run_config(label: str, task: LMTask, *, clients: int, rounds: int, workers: int, seed: int = 0,
               max_inflight: int = 2, log=print) -> dict:
    """Run one job through `run_job` on the connected Ray and return what it measured."""
    from fedray.orchestrator.engine import run_job
    from fedray.orchestrator.spec import JobSpec

    spec = JobSpec.from_dict(job_spec(clients=clients, rounds=rounds, workers=workers,
                                      batch=task.samples_per_client, seed=seed, max_inflight=max_inflight))
    numel = num_params(task.model())
    hwm_reset = _reset_own_hwm()
    driver_start = psutil.Process().memory_info().rss
    peaks = {"shard": 0, "workers": 0}
    pids: dict[str, list[int]] = {}

    def on_round(rec) -> None:
        pids["shard"] = _ray_processes("AggregationShard") or pids.get("shard", [])
        pids["workers"] = _ray_processes("_WorkerActor") or pids.get("workers", [])
        peaks["shard"] = max([peaks["shard"], *map(_hwm, pids["shard"])])
        peaks["workers"] = max([peaks["workers"], *map(_hwm, pids["workers"])])
        events.append((round(time.perf_counter() - store.t0, 2), f"round {rec.round} done"))
        log(f"[{label}] round {rec.round}: {rec.wall_s:.1f} s, up {rec.bytes_up / 1e6:.1f} MB, down "
            f"{rec.bytes_down / 1e6:.1f} MB, shard peak {peaks['shard'] / 2**20:.0f} MiB, "
            f"driver peak {_hwm(os.getpid()) / 2**20:.0f} MiB")

    store = _Sampler()
    events = []
    store.start()
    t0 = time.perf_counter()
    try:
        result = run_job(spec, progress=False, log=lambda m: None, task=task, on_round=on_round)
    finally:
        store.stop()
    wall = time.perf_counter() - t0
    fp32 = 4 * numel
    return {
        "label": label, "params": numel, "fp32_bytes": fp32, "clients_per_round": clients, "rounds": rounds,
        "workers": workers, "job_wall_s": round(wall, 2),
        "shard_peak_rss": peaks["shard"], "shard_pids": len(pids.get("shard", [])),
        "worker_peak_rss": peaks["workers"], "worker_pids": len(pids.get("workers", [])),
        "driver_peak_rss": _hwm(os.getpid()), "driver_rss_at_start": driver_start, "driver_hwm_reset": hwm_reset,
        "object_store_peak_bytes": store.store_peak, "object_store_samples": store.store_samples,
        "shard_peak_private_sampled": store.private_peak["shard"],
        "driver_peak_private_sampled": store.private_peak["driver"],
        "timeline_columns": ["s", "shard_rss_mib", "shard_shm_mib", "driver_rss_mib", "driver_shm_mib",
                             "object_store_mib"],
        "timeline": store.timeline[:: max(1, len(store.timeline) // 300)], "events": events,
        "per_round": [
            {"round": r.round, "wall_s": round(r.wall_s, 2), "clients": r.clients, "failed": r.failed,
             "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "train_loss": r.train_loss,
             "p2u_stage_bytes": [s["cumulative_bytes"] for s in (r.p2u_stages or [])]}
            for r in result.rounds
        ],
    }


def p2u_time(task: LMTask, *, bandwidths_mbit=(10, 100), seed: int = 0) -> dict:
    """P2U encode/decode time of `task`'s model and the time to its first usable model (stage 0
    received and decoded) at each bandwidth, against a one-shot fp32 send."""
    import torch

    from fedray.workers.broadcast import decode_broadcast, make_broadcast

    torch.manual_seed(seed)
    params = {k: v.detach().clone() for k, v in task.model().state_dict().items()}
    fp32 = sum(4 * v.numel() for v in params.values())
    t0 = time.perf_counter()
    b = make_broadcast(params, codec="p2u", codec_params=P2U, round=1)
    encode_s = time.perf_counter() - t0
    stage_bytes = b.stage_bytes()
    decode_s = []
    for k in range(1, len(stage_bytes) + 1):
        t0 = time.perf_counter()
        approx = decode_broadcast(b, k)
        decode_s.append(time.perf_counter() - t0)
        if k == 1:
            err0 = max(float((approx[n] - params[n]).abs().max()) for n in params)
        err = max(float((approx[n] - params[n]).abs().max()) for n in params)
        del approx
    rows = []
    for mbit in bandwidths_mbit:
        bw = mbit * MBIT
        first = stage_bytes[0] / bw + decode_s[0]
        full = sum(stage_bytes) / bw + decode_s[-1]
        rows.append({"mbit_s": mbit, "fp32_one_shot_s": round(fp32 / bw, 3), "p2u_first_usable_s": round(first, 3),
                     "p2u_all_stages_s": round(full, 3), "speedup_first_usable": round(fp32 / bw / first, 2)})
    return {"params": sum(v.numel() for v in params.values()), "fp32_bytes": fp32, "stage_bits": P2U["stage_bits"],
            "stage_bytes": stage_bytes, "encode_s": round(encode_s, 3),
            "encode_gb_s": round(fp32 / encode_s / 1e9, 4), "decode_s_by_stages": [round(x, 3) for x in decode_s],
            "max_abs_error_stage0": err0, "max_abs_error_all_stages": err, "time_to_first_usable": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 4], help="clients per round, one job each")
    ap.add_argument("--workers", type=int, default=2, help="worker actors")
    ap.add_argument("--object-store-mb", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-inflight", type=int, default=2, help="service.max_inflight: uploads a shard holds at once")
    ap.add_argument("--skip-p2u-time", action="store_true")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.workers < 1 or min(a.clients) < 1 or a.max_inflight < 1:
        ap.error("--rounds, --workers, --clients and --max-inflight must be >= 1")

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    # Every shard loads the fold kernels (numba and LLVM, ~120 MB), the tiny model's too, which
    # would not use them: the fixed overhead is then the same process code as the big model's.
    os.environ.setdefault("FEDRAY_FOLD_NUMBA", "always")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             object_store_memory=a.object_store_mb << 20)
    n = max(a.clients)
    jobs = []
    try:
        tiny = LMTask(**TINY, num_clients=n, samples_per_client=4, seed=a.seed)
        jobs.append(run_config("tiny", tiny, clients=n, rounds=a.rounds, workers=a.workers, seed=a.seed,
                               max_inflight=a.max_inflight))
        big = LMTask(**BIG, num_clients=n, samples_per_client=4, seed=a.seed)
        for c in a.clients:
            jobs.append(run_config(f"100M x{c}", big, clients=c, rounds=a.rounds, workers=a.workers, seed=a.seed,
                                   max_inflight=a.max_inflight))
    finally:
        ray.shutdown()
    p2u = None if a.skip_p2u_time else p2u_time(LMTask(**BIG, seed=a.seed), seed=a.seed)

    fixed = jobs[0]["shard_peak_rss"]
    for j in jobs[1:]:
        j["shard_target_bytes"] = 3 * j["fp32_bytes"] + fixed
        j["shard_met"] = j["shard_peak_rss"] <= j["shard_target_bytes"]
        j["shard_over_fixed_x_fp32"] = round((j["shard_peak_rss"] - fixed) / j["fp32_bytes"], 3)
        # the same without the object store's shared pages the shard writes its partial sum into
        fixed_private = jobs[0]["shard_peak_private_sampled"]
        j["shard_private_target_bytes"] = 3 * j["fp32_bytes"] + fixed_private
        j["shard_private_met"] = j["shard_peak_private_sampled"] <= j["shard_private_target_bytes"]
        j["shard_private_over_fixed_x_fp32"] = round(
            (j["shard_peak_private_sampled"] - fixed_private) / j["fp32_bytes"], 3)
        j["driver_over_start_x_fp32"] = round((j["driver_peak_rss"] - j["driver_rss_at_start"]) / j["fp32_bytes"], 3)
        j["worker_over_fixed_x_fp32"] = round((j["worker_peak_rss"] - jobs[0]["worker_peak_rss"]) / j["fp32_bytes"], 3)
    out = {
        "benchmark": "big_model",
        "command": "python " + " ".join([os.path.relpath(__file__, Path(__file__).resolve().parents[1]), *sys.argv[1:]])
        if argv is None else "big_model.main(" + repr(argv) + ")",
        "model": {"big": BIG, "tiny": TINY},
        "job": job_spec(clients=0, rounds=a.rounds, workers=a.workers, batch=4, seed=a.seed, max_inflight=a.max_inflight),
        "fixed_overhead_bytes": fixed,
        "jobs": jobs,
        "p2u_time": p2u,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    mib = 2**20
    print(f"fixed overhead (tiny model's shard peak): {fixed / mib:.0f} MiB")
    for j in jobs:
        line = (f"{j['label']:>10}: params {j['params'] / 1e6:.1f}M ({j['fp32_bytes'] / mib:.0f} MiB fp32), shard peak "
                f"{j['shard_peak_rss'] / mib:.0f} MiB, driver peak {j['driver_peak_rss'] / mib:.0f} MiB, worker peak "
                f"{j['worker_peak_rss'] / mib:.0f} MiB, object store peak "
                f"{j['object_store_peak_bytes'] / mib:.0f} MiB, rounds {[r['wall_s'] for r in j['per_round']]} s")
        if "shard_met" in j:
            line += (f", shard target {j['shard_target_bytes'] / mib:.0f} MiB met={j['shard_met']}; private peak "
                     f"{j['shard_peak_private_sampled'] / mib:.0f} MiB, target "
                     f"{j['shard_private_target_bytes'] / mib:.0f} MiB met={j['shard_private_met']}")
        print(line)
    if p2u:
        for r in p2u["time_to_first_usable"]:
            print(f"{r['mbit_s']} Mbit/s: fp32 one-shot {r['fp32_one_shot_s']} s, P2U first usable "
                  f"{r['p2u_first_usable_s']} s (x{r['speedup_first_usable']}), all stages {r['p2u_all_stages_s']} s")
    print(f"load average {load_start} -> {out['loadavg_end']}; wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
