"""fedray against a plain sequential PyTorch loop on a compute-bound task, side by side.

    python benchmarks/efficiency.py --json benchmarks/results/efficiency.json [--rounds 4] [--reps 2]

The task (the CIFAR-10 set-up pfl-research uses to compare frameworks, on Fashion-MNIST): CNN
conv5x5(32)-ReLU-maxpool2-conv5x5(64)-ReLU-maxpool2-fc(512)-ReLU-fc(10) (`model.kind: cnn`,
`model.hidden: [32, 64, 512]`), 1,000 IID clients of 60 images, 50 per round, 1 local epoch of
SGD at batch 10 and lr 0.05, FedAvg, evaluation of the global model on the 10,000 test images
after every round.

- `fedray`: the real job path (`run_job`: Ray worker actors, the `--codec` updates streamed over
  the gRPC aggregation service, FedAvg on the shard's running sum), `--cpus` worker actors on a
  local Ray of `--cpus` CPUs.
- `loop`: no framework, one process on the same cores: per round, for each sampled client,
  load the global weights into one model, train it with torch.optim.SGD, add its weights to a
  running sum; average; evaluate (in batches of `--loop-eval-batch`, default 128, the fastest
  plain-PyTorch batch here). It runs once per `--loop-threads` value (torch intra-op
  threads; default 1 and `--cpus`: on a loaded machine two threads that spin at every barrier
  can be far slower than one), and the ratio is taken against the fastest of them.

Each side runs in its own fresh process (this script with `--side`), alternating (`loop...,
fedray, fedray, loop..., ...`), `--reps` times. A side's steady-state round time is the median
of its rounds 2 onward over all its repetitions; the ratio is best loop / fedray (above 1:
fedray faster).
The JSON records every round's wall time and accuracy, the load average before and after each
run, the CPU model and the exact command. The machine is shared: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASK = dict(clients=1000, examples=60, per_round=50, hidden=(32, 64, 512), batch=10, lr=0.05, epochs=1, seed=0)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_fedray(rounds: int, cpus: int, codec: str, data_dir: str | None, batched: bool) -> list[dict]:
    from fedray.orchestrator.engine import ensure_ray, run_job
    from fedray.orchestrator.spec import (CompressionSpec, DataSpec, JobSpec, ModelSpec, ResourceSpec,
                                          TrainingSpec)

    t = TASK
    spec = JobSpec(
        name="efficiency", seed=t["seed"],
        data=DataSpec(dataset="fashion-mnist", data_dir=data_dir, num_clients=t["clients"]),
        model=ModelSpec(kind="cnn", hidden=t["hidden"]),
        training=TrainingSpec(rounds=rounds, clients_per_round=t["per_round"], local_epochs=t["epochs"],
                              batch_size=t["batch"], lr=t["lr"]),
        compression=CompressionSpec(codec=codec),
        resources=ResourceSpec(num_workers=cpus, batched=batched),
    )
    ensure_ray(cpus)
    res = run_job(spec, progress=False, log=lambda m: None)
    return [{"round": r.round, "wall_s": r.wall_s, "accuracy": r.accuracy} for r in res.rounds]


def run_loop(rounds: int, threads: int, data_dir: str | None, eval_batch: int = 128) -> list[dict]:
    import numpy as np
    import torch
    from torch import nn

    from fedray.workers.data import load_dataset  # reads the IDX files; nothing else of fedray

    torch.set_num_threads(threads)
    t = TASK
    d = load_dataset("fashion-mnist", data_dir)
    if len(d.y_train) < t["clients"] * t["examples"]:
        raise SystemExit(f"fashion-mnist has {len(d.y_train)} training images, the task needs {t['clients'] * t['examples']}")
    x_train = torch.from_numpy(d.x_train.astype(np.float32) * np.float32(d.scale) + np.float32(d.shift)).unsqueeze(1)
    y_train = torch.from_numpy(d.y_train)
    x_test = torch.from_numpy(d.x_test.astype(np.float32) * np.float32(d.scale) + np.float32(d.shift)).unsqueeze(1)
    y_test = torch.from_numpy(d.y_test)
    rng = np.random.default_rng(t["seed"])
    clients = rng.permutation(len(d.y_train))[: t["clients"] * t["examples"]].reshape(t["clients"], t["examples"])
    c1, c2, fc = t["hidden"]
    torch.manual_seed(t["seed"])
    model = nn.Sequential(
        nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, fc), nn.ReLU(), nn.Linear(fc, 10),
    )
    global_w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    out = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        ids = rng.choice(t["clients"], size=t["per_round"], replace=False)
        total = {k: torch.zeros_like(v) for k, v in global_w.items()}
        model.train()
        for c in ids:
            model.load_state_dict(global_w)
            opt = torch.optim.SGD(model.parameters(), lr=t["lr"])
            idx = torch.from_numpy(clients[c])
            for _ in range(t["epochs"]):
                perm = idx[torch.randperm(len(idx))]
                for i in range(0, len(perm), t["batch"]):
                    b = perm[i : i + t["batch"]]
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(x_train[b]), y_train[b]).backward()
                    opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    total[k] += v
        global_w = {k: v / len(ids) for k, v in total.items()}
        model.load_state_dict(global_w)
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y_test), eval_batch):
                correct += int((model(x_test[i : i + eval_batch]).argmax(1) == y_test[i : i + eval_batch]).sum())
        out.append({"round": r, "wall_s": time.perf_counter() - t0, "accuracy": correct / len(y_test)})
    return out


def _side(a) -> int:
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if a.side == "fedray":
        rounds = run_fedray(a.rounds, a.cpus, a.codec, a.data_dir, not a.unbatched)
    else:
        rounds = run_loop(a.rounds, int(a.side.split("-")[1]), a.data_dir, a.loop_eval_batch)
    print("RESULT " + json.dumps({"side": a.side, "rounds": rounds, "process_s": time.perf_counter() - t0,
                                  "load_before": load0, "load_after": os.getloadavg()}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: grpcio can abort at exit with Ray's threads alive


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--rounds", type=int, default=4, help="rounds per run (round 1 is warm-up)")
    p.add_argument("--reps", type=int, default=2, help="alternating runs of each side")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores for each side")
    p.add_argument("--codec", default="int8", choices=("int8", "identity"))
    p.add_argument("--unbatched", action="store_true", help="fedray trains its clients one by one")
    p.add_argument("--loop-threads", default=None, help="comma-separated torch thread counts for the loop (default: 1,CPUS)")
    p.add_argument("--loop-eval-batch", type=int, default=128,
                   help="the loop's evaluation batch (128: its fastest in plain NCHW here, 91 GFLOP/s against 49 at 4096; "
                        "benchmarks/conv_levers.py)")
    p.add_argument("--conv-kernels", default="eval,train",
                   help="fedray's conv kernels (FEDRAY_CONV_KERNELS: eval, train, both or none; workers/conv_kernels.py)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--side", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        return _side(a)
    if not a.json:
        p.error("--json is required")
    if a.rounds < 2 or a.reps < 1:
        p.error("--rounds must be >= 2 (round 1 is warm-up) and --reps >= 1")
    threads = sorted({int(v) for v in (a.loop_threads or f"1,{a.cpus}").split(",")})
    loops = [f"loop-{n}" for n in threads]
    runs: dict[str, list[dict]] = {name: [] for name in loops + ["fedray"]}
    t0 = time.perf_counter()
    base = [sys.executable, __file__, "--rounds", str(a.rounds), "--cpus", str(a.cpus), "--codec", a.codec,
            "--loop-eval-batch", str(a.loop_eval_batch)]
    base += ["--data-dir", a.data_dir] if a.data_dir else []
    base += ["--unbatched"] if a.unbatched else []
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", FEDRAY_CONV_KERNELS=a.conv_kernels)
    for rep in range(a.reps):
        for side in (loops + ["fedray"] if rep % 2 == 0 else ["fedray"] + loops[::-1]):
            proc = subprocess.run(base + ["--side", side], capture_output=True, text=True, env=env, timeout=3600)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"{side} run failed with exit code {proc.returncode}")
            res = json.loads(lines[-1][len("RESULT "):])
            runs[side].append(res)
            walls = ", ".join(f"{r['wall_s']:.2f}" for r in res["rounds"])
            print(f"{side:8s} rep {rep}: rounds {walls} s, accuracy {res['rounds'][-1]['accuracy']:.4f}, "
                  f"load {res['load_after'][0]:.1f}", flush=True)
    steady = {s: statistics.median(r["wall_s"] for run in rs for r in run["rounds"][1:]) for s, rs in runs.items()}
    best_loop = min(loops, key=lambda k: steady[k])
    ratio = steady[best_loop] / steady["fedray"]
    out = {
        "task": {**TASK, "hidden": list(TASK["hidden"]), "dataset": "fashion-mnist", "model": "cnn"},
        # resources.batched; CNN clients train one by one either way (workers.batched.batching_pays)
        "codec": a.codec, "resources_batched": not a.unbatched, "conv_kernels": a.conv_kernels, "loop_eval_batch": a.loop_eval_batch, "cpus": a.cpus, "rounds": a.rounds, "reps": a.reps,
        "steady_round_s": steady, "best_loop": best_loop, "speedup_fedray_over_loop": ratio, "target_speedup": 1.5,
        "met": ratio >= 1.5, "never_slower": ratio >= 1.0, "runs": runs,
        "cpu_model": _cpu_model(), "os_cpus": os.cpu_count(), "load": os.getloadavg(),
        "total_s": time.perf_counter() - t0,
        "command": "python benchmarks/efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print("steady-state round: " + ", ".join(f"{k} {steady[k]:.2f} s" for k in loops)
          + f"; fedray {steady['fedray']:.2f} s: fedray {ratio:.2f}x the speed of {best_loop} "
          f"(target >= 1.5x: {'met' if out['met'] else 'missed'})")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
