"""OMC, Federated Dropout and P2U against fp32 FedAvg on real data, in one process (no Ray).

    python benchmarks/compression_quality.py --json benchmarks/results/compression_quality.json
    python benchmarks/compression_quality.py --quick --json /tmp/cq.json     # smoke run

Data sets: Fashion-MNIST (100 clients, Dirichlet alpha 0.5 over labels, 10 per round, MLP
784-200-200-10) and JapaneseVowels (speaker classification; 9 clients, Dirichlet alpha 0.5 over
speakers, all per round, 1-D conv 12-64-64-9). One row per (arm, dataset, seed); the PNGs plot
test accuracy against cumulative bytes (down + up) per arm, seed 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedray.compression import CodecContext, available_codecs, get_codec
from fedray.compression.fd import CountedSum, SubnetSpec, extract, flops_per_example, submodel_hidden
from fedray.compression.payload import PayloadError
from fedray.compression.omc import OMCConfig, OMCModel, decode_params, encode_params, quantizable_names
from fedray.orchestrator.aggregation import RunningWeightedSum
from fedray.workers.data import load_dataset, partition
from fedray.workers.models import build_model, get_params, model_layout, set_params
from fedray.workers.train import TrainConfig, evaluate, train_local

torch.set_num_threads(1)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    hidden: tuple[int, ...]
    clients: int
    per_round: int
    rounds: int
    lr: float
    epochs: int
    block_bytes: int


TASKS = {
    "fashion-mnist": Task("fashion-mnist", "mlp", (200, 200), 100, 10, 20, 0.05, 1, 64 * 1024),
    "japanese-vowels": Task("japanese-vowels", "conv1d", (64, 64), 9, 9, 30, 0.05, 2, 4 * 1024),
}

# name -> OMCConfig (None: plain fp32) ; FD arms are separate.
OMC_ARMS = {
    "omc_int8_sr": OMCConfig(bits=8, stochastic=True),
    "omc_int4_sr": OMCConfig(bits=4, stochastic=True),
    "omc_int4_rtn": OMCConfig(bits=4, stochastic=False),
    "omc_int4_sr_global": OMCConfig(bits=4, stochastic=True, per_variable=False),
}
FD_ARMS = {  # keep rate, policy, compressed wire
    "fd_r0.5_q4down_q2up": (0.5, "random", True),
    "fd_r0.75_q4down_q2up": (0.75, "random", True),
    "fd_r0.75_fp32wire": (0.75, "random", False),
}
P2U_STAGES = (2, 2, 4, 8)


def _codecs():
    have = set(available_codecs())
    if "uniform" in have:  # the codec library's b-bit affine quantizer
        down = get_codec("uniform", bits=4, mode="affine", rounding="nearest")
        up = get_codec("uniform", bits=2, mode="affine", rounding="stochastic")
    else:
        down = get_codec("omc", bits=4)
        up = get_codec("omc", bits=2, stochastic=True)
    return down, up


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


class Run:
    """One (arm, dataset, seed) federated run; records the accuracy curve and the costs."""

    def __init__(self, task: Task, data, parts, seed: int, quick: bool) -> None:
        self.t, self.d, self.parts, self.seed = task, data, parts, seed
        self.rounds = 3 if quick else task.rounds
        self.layout = model_layout(task.kind, data.input_shape, data.num_classes, task.hidden)
        torch.manual_seed(seed)
        self.global_params = get_params(build_model(task.kind, data.input_shape, data.num_classes, task.hidden))
        self.bytes_up = self.bytes_down = self.flops = 0
        self.time_s = 0.0
        self.mem = 0
        self.curve: list[tuple[int, float]] = []
        self.cfg = TrainConfig(local_epochs=task.epochs, batch_size=32, lr=task.lr)
        n_test = 2000 if quick else len(data.y_test)
        self.xte, self.yte = data.x_test[:n_test], data.y_test[:n_test]

    def sample(self, r: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, r, 0x5A])
        return np.sort(rng.choice(self.t.clients, self.t.per_round, replace=False))

    def client_data(self, k: int, quick: bool):
        idx = self.parts.client(k)
        return self.d.x_train[idx], self.d.y_train[idx]

    def accuracy(self, params) -> float:
        m = build_model(self.t.kind, self.d.input_shape, self.d.num_classes, self.t.hidden)
        set_params(m, params)
        return evaluate(m, self.xte, self.yte, self.d.scale, self.d.shift)[0]

    def log(self, params) -> None:
        self.curve.append((self.bytes_up + self.bytes_down, self.accuracy(params)))

    def row(self, arm: str, final_params) -> dict:
        acc = self.accuracy(final_params)
        return {"arm": arm, "dataset": self.t.name, "seed": self.seed, "final_accuracy": acc,
                "bytes_up": int(self.bytes_up), "bytes_down": int(self.bytes_down),
                "param_memory_bytes": int(self.mem), "client_flops": int(self.flops),
                "client_time_s": round(self.time_s, 3), "rounds": self.rounds,
                "curve": [[int(b), round(a, 4)] for b, a in self.curve]}


def _train(run: Run, model, x, y, seed: int, **kw):
    t0 = time.perf_counter()
    stats = train_local(model, x, y, run.d.scale, run.d.shift, run.cfg, seed, **kw)
    run.time_s += time.perf_counter() - t0
    return stats


def run_fp32(run: Run) -> dict:
    fp32_bytes = 4 * sum(v.numel() for v in run.global_params.values())
    run.mem = fp32_bytes
    for r in range(run.rounds):
        agg = RunningWeightedSum({k: tuple(v.shape) for k, v in run.global_params.items()})
        for k in run.sample(r):
            x, y = run.client_data(k, False)
            model = build_model(run.t.kind, run.d.input_shape, run.d.num_classes, run.t.hidden)
            set_params(model, run.global_params)
            run.bytes_down += fp32_bytes
            _train(run, model, x, y, _seed(run.seed, r, int(k)))
            run.bytes_up += fp32_bytes
            run.flops += flops_per_example(run.layout) * len(y) * run.t.epochs
            agg.add(get_params(model), float(len(y)))
        run.global_params = agg.mean()
        run.log(run.global_params)
    return run.row("fp32_fedavg", run.global_params)


def run_omc(run: Run, arm: str, cfg: OMCConfig) -> dict:
    cfg = cfg.replace(block_bytes=run.t.block_bytes)
    names = quantizable_names(build_model(run.t.kind, run.d.input_shape, run.d.num_classes, run.t.hidden))
    try:
        _omc_rounds(run, cfg, names)
    except PayloadError as e:  # training diverged to NaN/inf: the stored form cannot hold it
        print(f"{arm}: diverged ({e}); recorded as such", flush=True)
        row = run.row(arm, run.global_params)
        row["diverged"] = True
        return row
    return run.row(arm, decode_params(encode_params(run.global_params, cfg, quantized=names)))


def _omc_rounds(run: Run, cfg: OMCConfig, names) -> None:
    for r in range(run.rounds):
        down = encode_params(run.global_params, cfg, quantized=names)  # RTN: deterministic broadcast
        agg = RunningWeightedSum({k: tuple(v.shape) for k, v in run.global_params.items()})
        for k in run.sample(r):
            x, y = run.client_data(k, False)
            cseed = _seed(run.seed, r, int(k))
            model = build_model(run.t.kind, run.d.input_shape, run.d.num_classes, run.t.hidden)
            om = OMCModel(model, cfg, seed=cseed)
            om.load_payloads(down)
            run.bytes_down += sum(p.nbytes for p in down.values())
            _train(run, model, x, y, cseed, omc=om)
            up = om.to_payloads()
            run.bytes_up += sum(p.nbytes for p in up.values())
            run.mem = max(run.mem, om.param_memory_bytes())
            run.flops += flops_per_example(run.layout) * len(y) * run.t.epochs
            agg.add(decode_params(up), float(len(y)))
        run.global_params = agg.mean()
        run.log(decode_params(encode_params(run.global_params, cfg, quantized=names)))


def _wire(codec, tensors, seed: int):
    """Encode then decode each tensor; returns (decoded, bytes)."""
    out, nbytes = {}, 0
    for name, t in tensors.items():
        ctx = CodecContext(seed=seed, key=name)
        p = codec.encode(t, ctx)
        nbytes += p.nbytes
        out[name] = codec.decode(p, ctx).reshape(t.shape)
    return out, nbytes


def run_fd(run: Run, arm: str, rate: float, policy: str, compressed: bool) -> dict:
    down_c, up_c = _codecs() if compressed else (get_codec("identity"), get_codec("identity"))
    for r in range(run.rounds):
        acc = CountedSum(dict(run.layout.shapes))
        for k in run.sample(r):
            x, y = run.client_data(k, False)
            cseed = _seed(run.seed, r, int(k))
            spec = SubnetSpec(cseed, rate, policy, round=r, client=int(k))
            sub, nb = _wire(down_c, extract(run.global_params, run.layout, spec), cseed)
            run.bytes_down += nb
            model = build_model(run.t.kind, run.d.input_shape, run.d.num_classes, submodel_hidden(run.layout, spec))
            set_params(model, sub)
            run.mem = max(run.mem, 4 * sum(v.numel() for v in sub.values()))
            _train(run, model, x, y, cseed)
            delta = {n: v - sub[n] for n, v in get_params(model).items()}
            delta, nb = _wire(up_c, delta, cseed + 1)
            run.bytes_up += nb
            run.flops += flops_per_example(run.layout, spec) * len(y) * run.t.epochs
            acc.add(delta, run.layout, spec, float(len(y)))
        md = acc.mean_delta()
        run.global_params = {n: v + md[n] for n, v in run.global_params.items()}
        run.log(run.global_params)
    return run.row(arm, run.global_params)


def p2u_rows(run: Run, fp32_row: dict) -> list[dict]:
    """P2U download of the final fp32 model: accuracy after each stage against cumulative bytes."""
    from fedray.compression.p2u import P2UConfig, decode_stages, encode_stages

    cfg = P2UConfig(stage_bits=P2U_STAGES)
    stages = {n: encode_stages(t, cfg=cfg) for n, t in run.global_params.items()}
    rows, cum = [], 0
    for s in range(len(P2U_STAGES)):
        cum += sum(st[s].nbytes for st in stages.values())
        params = {n: decode_stages(st[: s + 1]).reshape(run.global_params[n].shape) for n, st in stages.items()}
        acc = run.accuracy(params)
        bits = sum(P2U_STAGES[: s + 1])
        rows.append({"arm": f"p2u_stage{s}_{bits}bit", "dataset": run.t.name, "seed": run.seed,
                     "final_accuracy": acc, "bytes_up": 0, "bytes_down": cum,
                     "param_memory_bytes": fp32_row["param_memory_bytes"], "client_flops": 0, "client_time_s": 0.0,
                     "fp32_accuracy": fp32_row["final_accuracy"],
                     "time_to_model_s": {f"{m}mbit": round(cum * 8 / (m * 1e6), 5) for m in (1, 10, 100)}})
    return rows


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for ds in sorted({r["dataset"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if r["dataset"] == ds and r["seed"] == min(x["seed"] for x in rows) and r.get("curve"):
                b, a = zip(*r["curve"])
                ax.plot(np.array(b) / 1e6, a, marker=".", label=r["arm"])
        p2u = [r for r in rows if r["dataset"] == ds and r["arm"].startswith("p2u") and r["seed"] == 0]
        if p2u:
            ax.scatter([r["bytes_down"] / 1e6 for r in p2u], [r["final_accuracy"] for r in p2u], marker="x", c="k",
                       label="p2u stages (final model download)", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes, down + up (MB, log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{ds}: accuracy vs cumulative bytes (seed 0)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"compression_quality_{ds}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the rows")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 seed, small test sets: a smoke run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", default="fashion-mnist,japanese-vowels")
    ap.add_argument("--arms", default="", help="comma-separated arm names to run (default: all)")
    args = ap.parse_args(argv)
    seeds = [0] if args.quick else list(range(args.seeds))
    wanted = set(filter(None, args.arms.split(",")))
    rows: list[dict] = []
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for ds in args.datasets.split(","):
        task = TASKS[ds]
        data = load_dataset(ds)
        for seed in seeds:
            parts = partition(data.y_train, task.clients, method="dirichlet", alpha=0.5, seed=seed)

            def go(arm, fn, *a):
                if wanted and arm not in wanted and not (arm == "fp32_fedavg"):
                    return None
                t0 = time.perf_counter()
                run = Run(task, data, parts, seed, args.quick)
                row = fn(run, *a) if fn is run_fp32 else fn(run, arm, *a)
                print(f"{ds} seed={seed} {arm}: acc={row['final_accuracy']:.4f} up={row['bytes_up']} "
                      f"down={row['bytes_down']} mem={row['param_memory_bytes']} ({time.perf_counter() - t0:.0f}s)", flush=True)
                rows.append(row)
                return run, row

            run, fp32 = go("fp32_fedavg", run_fp32)
            rows.extend(p2u_rows(run, fp32))
            for arm, cfg in OMC_ARMS.items():
                go(arm, run_omc, cfg)
            for arm, (rate, policy, comp) in FD_ARMS.items():
                go(arm, run_fd, rate, policy, comp)
            out.write_text(json.dumps(rows, indent=1))
    out.write_text(json.dumps(rows, indent=1))
    plot(rows, out.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
