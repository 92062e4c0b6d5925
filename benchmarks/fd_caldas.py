"""Federated Dropout as Caldas et al. (arXiv 1812.07210) measured it, against fp32 FedAvg.

    python benchmarks/fd_caldas.py --json benchmarks/results/fd_caldas.json
    python benchmarks/fd_caldas.py --quick --json /tmp/fdc.json      # smoke run

Two tasks, in one process (no Ray), every arm of a seed in the same run:
- `cnn`: Fashion-MNIST, the paper's CNN shape scaled down (conv5x5(c1)-pool-conv5x5(c2)-pool-
  FC(fc)-head); Federated Dropout drops conv filters and FC units (the layout of the built-in
  `cnn` model kind: filters, their H*W expansion into the FC layer, FC units; the input channel
  and the classes are never dropped).
- `lstm`: the Shakespeare task of examples/shakespeare (one client per role); Federated Dropout
  drops each LSTM layer's hidden units (the task's `fd_layout`).

Arms: `fp32_fedavg` (full model, fp32 both ways) and `fd_r{keep}_q{down}down_q{up}up`: a random
subnet per client and round (keep rate of every hidden group), the sub-model sent down with the
codec library's `uniform` affine quantizer (round to nearest), the sub-model's delta sent up with
the same quantizer at fewer bits and stochastic rounding, both one range per tensor. Server:
per-coordinate mean of the deltas over the clients that trained it (`CountedSum.mean_delta`).
The Caldas headline (14x down, 28x up, 1.7x compute) is keep 0.75 with 4-bit down and 2-bit up.
`--rotation hadamard --down-rounding stochastic` is the paper's pipeline without subsampling: a
randomized Hadamard rotation (random signs, then H/sqrt(m) on power-of-2 pieces, so no padding and
no extra coefficients) before quantizing each tensor in both directions, and probabilistic
(stochastic) rounding of the broadcast too. `--scaling all` trains each sub-model as inverted
dropout does (kept inputs scaled by units / kept: `fd.input_scales`, `fd.inverted_scaling`, the
`dropout.scaling` option of jobs). `--lstm-lr` / `--cnn-lr` set every arm's client lr, `--fd-lr`
the FD arms' alone; `--server-lr` and `--server-momentum` (FedAvgM) apply to every arm.

Measured per run: bytes down and up (encoded payload bytes, summed over clients and rounds),
analytic client FLOPs (`flops_per_example`, training = 3x forward), test accuracy per round.
Equal rounds: every arm runs `rounds`; an FD arm then runs on (up to `extra` more rounds) until it
reaches the target accuracy (fp32's accuracy at `rounds`, same seed, minus 1 point), and its
rounds, bytes and FLOPs to that target are recorded. With `--eval-last N` accuracy is also the
mean over the last N rounds (`accuracy_last_k`), and the target and its test use that N-round mean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedray.compression import CodecContext, get_codec
from fedray.compression.fd import (SCALINGS, CountedSum, SubnetSpec, extract, flops_per_example, input_scales,
                                   inverted_scaling, submodel_hidden)
from fedray.workers.data import load_dataset, partition
from fedray.workers.models import build_model, get_params, model_layout, set_params

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@dataclass(frozen=True)
class Arm:
    name: str
    keep: float
    down_bits: int | None  # None: fp32
    up_bits: int | None
    rotation: str = "none"  # "hadamard": randomized Hadamard transform before quantizing (both ways)
    down_rounding: str = "nearest"  # "stochastic": the paper's probabilistic quantization
    scaling: str = "none"  # inverted dropout of the sub-model's inputs (fd.input_scales)
    lr: float | None = None  # client learning rate; None: the task's
    server_lr: float = 1.0  # global += server_lr * v, v = server_momentum * v + mean delta
    server_momentum: float = 0.0


FP32 = Arm("fp32_fedavg", 1.0, None, None)


@dataclass
class Setting:
    """One task's federated setting (recorded in the JSON)."""

    task: str
    model: str
    clients: int
    per_round: int
    rounds: int
    extra: int
    local_epochs: int
    batch_size: int
    lr: float
    test_examples: int
    notes: dict = field(default_factory=dict)
    eval_last: int = 1  # accuracy "at equal rounds" also as the mean over the last eval_last rounds


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, batch: int, epochs: int, seed: int) -> int:
    """Plain minibatch SGD on cross-entropy; batch order from `seed`. Returns examples seen."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            b = perm[i: i + batch]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return len(y) * epochs


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 500):
            correct += int((model(x[i: i + 500]).argmax(1) == y[i: i + 500]).sum())
    return correct / max(1, len(y))


class CNNTask:
    """Fashion-MNIST, Dirichlet(0.5) label skew over clients, the built-in `cnn` model kind."""

    def __init__(self, s: Setting, hidden: tuple[int, int, int], per_client: int, seed: int) -> None:
        self.s, self.hidden = s, hidden
        d = load_dataset("fashion-mnist")
        self.shape, self.classes = tuple(d.input_shape), d.num_classes
        scale, shift = (d.scale or 1.0), d.shift
        parts = partition(d.y_train, s.clients, method="dirichlet", alpha=0.5, seed=seed)
        self.data = []
        for k in range(s.clients):
            idx = parts.client(k)[:per_client]
            x = torch.from_numpy(d.x_train[idx].astype(np.float32) * scale + shift).reshape(-1, *self.shape)
            self.data.append((x, torch.from_numpy(np.asarray(d.y_train[idx], dtype=np.int64))))
        xt = d.x_test[: s.test_examples].astype(np.float32) * scale + shift
        self.test = (torch.from_numpy(xt).reshape(-1, *self.shape),
                     torch.from_numpy(np.asarray(d.y_test[: s.test_examples], dtype=np.int64)))
        self.layout = model_layout("cnn", self.shape, self.classes, hidden)

    def model(self, hidden=None) -> nn.Module:
        return build_model("cnn", self.shape, self.classes, hidden or self.hidden)


class LSTMTask:
    """examples/shakespeare's task: one client per role, the CharLSTM, hidden units dropped."""

    def __init__(self, s: Setting, *, hidden: int, seq_len: int, per_client: int) -> None:
        sys.path.insert(0, str(ROOT / "examples" / "shakespeare"))
        from shakespeare_task import ShakespeareTask

        self.s = s
        self.task = ShakespeareTask(max_clients=s.clients, max_samples_per_client=per_client,
                                    max_test_samples=s.test_examples, hidden=hidden, seq_len=seq_len)
        self.data = [self._tensors(self.task.client_data(k)) for k in range(self.task.num_clients())]
        self.test = self._tensors(self.task.test_data())
        self.layout = self.task.fd_layout()
        self.hidden = tuple(h for _, h in self.layout.groups)

    @staticmethod
    def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        t = ds.targets
        x = ds.ids[t[:, None] - ds.seq_len + torch.arange(ds.seq_len)[None, :]]
        return x, ds.ids[t]

    def model(self, hidden=None) -> nn.Module:
        return self.task.fd_model(hidden or self.hidden)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of a flat tensor whose length is a power of 2."""
    m, h = x.numel(), 1
    while h < m:
        v = x.view(-1, 2, h)
        x = torch.stack((v[:, 0] + v[:, 1], v[:, 0] - v[:, 1]), dim=1)
        h *= 2
    return x.reshape(m)


def _pieces(n: int) -> list[tuple[int, int]]:
    """(start, length) of the power-of-2 pieces of a length-n vector, largest first: the
    Hadamard transform then needs no padding, so it adds no coefficients to the wire."""
    out, s = [], 0
    while s < n:
        m = 1 << ((n - s).bit_length() - 1)
        out.append((s, m))
        s += m
    return out


def hadamard(x: torch.Tensor, seed: int, *, inverse: bool = False) -> torch.Tensor:
    """Randomized Hadamard rotation (random signs D, then H / sqrt(m) on each power-of-2 piece;
    Konecny et al. 2016's structured rotation, the basis transform of Caldas et al.'s broadcast).
    Orthonormal: `hadamard(hadamard(x, s), s, inverse=True) == x` up to rounding."""
    flat = x.reshape(-1).to(torch.float32)
    g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    signs = torch.randint(0, 2, (flat.numel(),), generator=g).to(torch.float32).mul_(2).sub_(1)
    out = torch.empty_like(flat)
    for s, m in _pieces(flat.numel()):
        if inverse:
            out[s: s + m] = _fwht(flat[s: s + m].clone()) * (m ** -0.5) * signs[s: s + m]
        else:
            out[s: s + m] = _fwht(flat[s: s + m] * signs[s: s + m]) * (m ** -0.5)
    return out.reshape(x.shape)


def _wire(codec, tensors: dict, seed: int, rotation: str = "none") -> tuple[dict, int]:
    """Encode and decode every tensor; the decoded tensors and the encoded payload bytes.
    With `rotation="hadamard"` each tensor is rotated before encoding and rotated back after
    decoding (the rotation's signs come from the seed both sides share: no extra bytes)."""
    out, nbytes = {}, 0
    for name, t in tensors.items():
        ctx = CodecContext(seed=seed, key=name)
        rseed = _seed(seed & 0xFFFFFFFF, sum(map(ord, name)), len(name))
        x = hadamard(t, rseed) if rotation == "hadamard" else t
        p = codec.encode(x, ctx)
        nbytes += p.nbytes
        y = codec.decode(p, ctx).reshape(t.shape)
        out[name] = hadamard(y, rseed, inverse=True) if rotation == "hadamard" else y
    return out, nbytes


def _codecs(arm: Arm):
    """(down, up) codecs: `uniform` affine at the arm's bits; None or 32 bits: fp32 (identity)."""
    def pick(bits, rounding):
        if bits is None or bits == 32:
            return get_codec("identity")
        return get_codec("uniform", bits=bits, mode="affine", rounding=rounding)
    return pick(arm.down_bits, arm.down_rounding), pick(arm.up_bits, "stochastic")


def run_arm(task, arm: Arm, seed: int, *, target: float | None, log) -> dict:
    """One federated run; `target` (accuracy) lets an FD arm run on past `rounds` to reach it."""
    s = task.s
    torch.manual_seed(seed)
    params = get_params(task.model())
    down_c, up_c = _codecs(arm)
    bytes_down = bytes_up = flops = 0
    curve = []
    velocity = None
    lr = s.lr if arm.lr is None else arm.lr
    t0 = time.perf_counter()
    max_rounds = s.rounds + (s.extra if target is not None else 0)
    for r in range(max_rounds):
        rng = np.random.default_rng([seed, r, 0x5A])
        ids = np.sort(rng.choice(len(task.data), s.per_round, replace=False))
        acc = CountedSum(dict(task.layout.shapes))
        for k in ids:
            x, y = task.data[int(k)]
            cseed = _seed(seed, r, int(k))
            spec = SubnetSpec(cseed, arm.keep, "random", round=r, client=int(k))
            sub, nb = _wire(down_c, extract(params, task.layout, spec), cseed, arm.rotation)
            bytes_down += nb
            model = task.model(submodel_hidden(task.layout, spec))
            set_params(model, sub)
            with inverted_scaling(model, input_scales(task.layout, spec, arm.scaling)):
                n = sgd(model, x, y, lr=lr, batch=s.batch_size, epochs=s.local_epochs, seed=cseed)
            delta = {name: v - sub[name] for name, v in get_params(model).items()}
            delta, nb = _wire(up_c, delta, cseed + 1, arm.rotation)
            bytes_up += nb
            flops += flops_per_example(task.layout, spec) * n
            acc.add(delta, task.layout, spec, float(len(y)))
        md = acc.mean_delta()
        if arm.server_momentum:
            velocity = md if velocity is None else {k: arm.server_momentum * velocity[k] + md[k] for k in md}
            md = velocity
        params = {name: v + arm.server_lr * md[name] for name, v in params.items()}
        m = task.model()
        set_params(m, params)
        a = accuracy(m, *task.test)
        window = [c["accuracy"] for c in curve[max(0, r + 1 - s.eval_last):]] + [a]
        smooth = float(np.mean(window))
        curve.append({"round": r + 1, "accuracy": round(a, 5), "bytes_down": int(bytes_down),
                      "bytes_up": int(bytes_up), "client_flops": int(flops),
                      "accuracy_last_k": round(smooth, 5)})
        if r + 1 >= max(s.rounds, s.eval_last) and (target is None or smooth >= target):
            break
    at = curve[s.rounds - 1]
    # With eval_last > 1 the target is met by the moving average over eval_last rounds.
    reached = next((c for c in curve if target is not None and c["round"] >= s.eval_last
                    and c["accuracy_last_k"] >= target), None)
    row = {"task": s.task, "arm": arm.name, "seed": seed, "keep_rate": arm.keep, "down_bits": arm.down_bits or 32,
           "up_bits": arm.up_bits or 32, "rotation": arm.rotation, "down_rounding": arm.down_rounding,
           "scaling": arm.scaling, "lr": lr, "server_lr": arm.server_lr, "server_momentum": arm.server_momentum,
           "rounds": s.rounds, "final_accuracy": at["accuracy"],
           "eval_last": s.eval_last, "accuracy_last_k": at["accuracy_last_k"],
           "bytes_down": at["bytes_down"], "bytes_up": at["bytes_up"], "client_flops": at["client_flops"],
           "target_accuracy": target, "rounds_to_target": reached["round"] if reached else None,
           "to_target": reached, "wall_s": round(time.perf_counter() - t0, 1), "curve": curve}
    log(f"{s.task} seed={seed} {arm.name}: acc@{s.rounds}={at['accuracy']:.4f} "
        f"last{s.eval_last}={at['accuracy_last_k']:.4f} down={at['bytes_down']} "
        f"up={at['bytes_up']} flops={at['client_flops']:.3g} rounds_to_target={row['rounds_to_target']} "
        f"({row['wall_s']}s)")
    return row, params


def omc_transform_rows(task, params: dict, seed: int) -> list[dict]:
    """OMC's stored form of every weight matrix of the trained model (embedding, LSTM kernels,
    head), one affine (alpha, beta) per variable against one shared by all: test accuracy.

    OMCModel trains Linear/Conv weights compressed and keeps recurrent layers fp32, so on this
    model it would quantize the head alone; this applies OMC's own transform and quantizer
    (`stored_form`: `fit_transform`, `quantize`, `dequantize`, round to nearest) to all of them.
    """
    from fedray.compression.omc import stored_form

    names = [k for k, v in params.items() if v.dim() >= 2]
    ranges = {k: [round(float(params[k].min()), 4), round(float(params[k].max()), 4)] for k in names}
    rows = []
    for bits in (8, 4):
        for per_variable in (True, False):
            q = {**params, **stored_form({k: params[k] for k in names}, bits=bits, per_variable=per_variable)}
            m = task.model()
            set_params(m, q)
            rows.append({"seed": seed, "bits": bits, "per_variable": per_variable,
                         "accuracy": round(accuracy(m, *task.test), 5)})
    m = task.model()
    set_params(m, params)
    fp32 = round(accuracy(m, *task.test), 5)
    for r in rows:
        r.update(fp32_accuracy=fp32, ranges=ranges)
    return rows


def paper_size_costs(arm: Arm, seed: int = 0) -> list[dict]:
    """The same arm's per-client costs on the paper's full-size models, from their shapes alone
    (no training): the encoded bytes of a random subnet's sub-model and of its delta under the
    arm's codecs, and the analytic FLOPs, against fp32."""
    sys.path.insert(0, str(ROOT / "examples" / "shakespeare"))
    from shakespeare_task import ShakespeareTask

    lstm = ShakespeareTask(hidden=256, seq_len=80)  # reads no data: layout and model only
    models = {"cnn (32, 64, 2048)": (model_layout("cnn", (28, 28), 10, (32, 64, 2048)),
                                     lambda: build_model("cnn", (28, 28), 10, (32, 64, 2048))),
              "CharLSTM 2x256, seq_len 80": (lstm.fd_layout(), lambda: lstm.model())}
    down_c, up_c = _codecs(arm)
    out = []
    for name, (layout, make) in models.items():
        torch.manual_seed(seed)
        params = get_params(make())
        spec = SubnetSpec(seed, arm.keep, "random")
        sub = extract(params, layout, spec)
        _, down = _wire(down_c, sub, seed, arm.rotation)
        _, up = _wire(up_c, {k: 0.01 * torch.randn(v.shape) for k, v in sub.items()}, seed + 1, arm.rotation)
        _, fp32 = _wire(get_codec("identity"), params, seed)
        out.append({"model": name, "arm": arm.name, "params": sum(v.numel() for v in params.values()),
                    "sub_params": sum(v.numel() for v in sub.values()), "fp32_bytes": fp32, "bytes_down": down,
                    "bytes_up": up, "down_ratio": round(fp32 / down, 2), "up_ratio": round(fp32 / up, 2),
                    "flops_ratio": round(flops_per_example(layout) / flops_per_example(layout, spec), 3)})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per (task, arm): means over seeds and ratios against fp32 FedAvg of the same seeds."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        base = {r["seed"]: r for r in rows if r["task"] == task and r["arm"] == FP32.name}
        for arm in dict.fromkeys(r["arm"] for r in rows if r["task"] == task):
            rs = [r for r in rows if r["task"] == task and r["arm"] == arm and r["seed"] in base]
            mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
            ratio = lambda k: float(np.mean([base[r["seed"]][k] for r in rs])) / max(mean(k), 1e-12)  # noqa: E731
            accs = [r["final_accuracy"] for r in rs]
            delta = float(np.mean([r["final_accuracy"] - base[r["seed"]]["final_accuracy"] for r in rs]))
            last = [r.get("accuracy_last_k", r["final_accuracy"]) for r in rs]
            delta_last = float(np.mean([r.get("accuracy_last_k", r["final_accuracy"])
                                        - base[r["seed"]].get("accuracy_last_k", base[r["seed"]]["final_accuracy"])
                                        for r in rs]))
            rt = [r["rounds_to_target"] for r in rs]
            s = {"task": task, "arm": arm, "seeds": len(rs), "accuracy_mean": round(float(np.mean(accs)), 5),
                 "accuracy_std": round(float(np.std(accs)), 5), "delta_points": round(100 * delta, 2),
                 "down_ratio": round(ratio("bytes_down"), 2), "up_ratio": round(ratio("bytes_up"), 2),
                 "flops_ratio": round(ratio("client_flops"), 3),
                 "rounds_to_target": rt, "bytes_down_mean": mean("bytes_down"), "bytes_up_mean": mean("bytes_up"),
                 "client_flops_mean": mean("client_flops"),
                 "eval_last": rs[0].get("eval_last", 1), "accuracy_last_mean": round(float(np.mean(last)), 5),
                 "accuracy_last_std": round(float(np.std(last)), 5), "delta_points_last": round(100 * delta_last, 2)}
            if arm != FP32.name:
                s["targets_met"] = {"down_14x": s["down_ratio"] >= 14, "up_28x": s["up_ratio"] >= 28,
                                    "flops_1.7x": s["flops_ratio"] >= 1.7, "within_1pt": delta >= -0.01,
                                    "within_1pt_last": delta_last >= -0.01}
                hit = [r for r in rs if r["to_target"]]
                if len(hit) == len(rs):  # costs to reach fp32's accuracy minus 1 point, each arm's own round
                    k = rs[0].get("eval_last", 1)
                    ref = [next((c for c in base[r["seed"]]["curve"] if c["round"] >= k
                                 and c.get("accuracy_last_k", c["accuracy"]) >= r["target_accuracy"]),
                                base[r["seed"]]["curve"][-1]) for r in hit]
                    s["fp32_rounds_to_target"] = [c["round"] for c in ref]
                    for key in ("bytes_down", "bytes_up", "client_flops"):
                        s[f"to_target_{key}_ratio"] = round(float(np.mean([c[key] for c in ref]))
                                                            / float(np.mean([r["to_target"][key] for r in hit])), 3)
            out.append(s)
    return out


def make_task(name: str, args, seed: int):
    """The task of `--tasks` entry `name`, sized by the command line."""
    if name == "cnn":
        hidden = (8, 16, 128) if args.quick else (16, 32, 256)
        s = Setting("cnn", f"cnn {hidden}", 30, args.cnn_per_round, 2 if args.quick else args.cnn_rounds,
                    args.extra, 1, 20, args.cnn_lr, 500 if args.quick else 2000,
                    {"dataset": "fashion-mnist", "partition": "dirichlet(0.5) over labels",
                     "examples_per_client_max": 300, "paper_model": "LEAF FEMNIST CNN (32, 64, 2048)"},
                    args.eval_last)
        return CNNTask(s, hidden, 300, seed)
    hidden, seq_len = (32, 20) if args.quick else (args.lstm_hidden, args.lstm_seq_len)
    per = 100 if args.quick else args.lstm_windows
    s = Setting("lstm", f"CharLSTM 8-d embed, 2x{hidden}, seq_len {seq_len}", args.lstm_clients,
                args.lstm_per_round, 2 if args.quick else args.lstm_rounds, args.extra, args.lstm_epochs, 10,
                args.lstm_lr,
                300 if args.quick else 1500,
                {"dataset": "shakespeare (examples/shakespeare)",
                 "roles": f"the {args.lstm_clients} with the most speeches",
                 "windows_per_client_max": per, "paper_model": "LEAF 2x256 LSTM, seq_len 80"},
                args.eval_last)
    return LSTMTask(s, hidden=hidden, seq_len=seq_len, per_client=per)


def parse_arms(text: str, rotation: str = "none", down_rounding: str = "nearest", **extra) -> list[Arm]:
    """`--arms` entries keep:down_bits:up_bits (32 bits: fp32 on that direction)."""
    arms = []
    for a in filter(None, text.split(",")):
        try:
            k, d, u = a.split(":")
            arm = Arm(f"fd_r{k}_q{d}down_q{u}up", float(k), int(d), int(u), rotation, down_rounding, **extra)
        except ValueError:
            raise SystemExit(f"--arms: {a!r} is not keep:down_bits:up_bits, e.g. 0.75:4:2") from None
        if not 0 < arm.keep <= 1 or not (1 <= arm.down_bits <= 8 or arm.down_bits == 32) \
                or not (1 <= arm.up_bits <= 8 or arm.up_bits == 32):
            raise SystemExit(f"--arms: {a!r}: keep must be in (0, 1], bits in 1..8 or 32")
        arms.append(arm)
    return arms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, tiny data: a smoke run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default="cnn,lstm")
    ap.add_argument("--arms", default="0.75:4:2", help="FD arms as keep:down_bits:up_bits, comma-separated")
    ap.add_argument("--cnn-rounds", type=int, default=12)
    ap.add_argument("--lstm-rounds", type=int, default=20)
    ap.add_argument("--lstm-hidden", type=int, default=64)
    ap.add_argument("--lstm-seq-len", type=int, default=20)
    ap.add_argument("--lstm-epochs", type=int, default=2)
    ap.add_argument("--lstm-windows", type=int, default=300, help="training windows per role (evenly spaced)")
    ap.add_argument("--lstm-clients", type=int, default=20, help="roles kept (those with the most speeches)")
    ap.add_argument("--extra", type=int, default=6, help="rounds an FD arm may run on to reach the target")
    ap.add_argument("--cnn-lr", type=float, default=0.05)
    ap.add_argument("--cnn-per-round", type=int, default=5, help="clients per round (of 30)")
    ap.add_argument("--lstm-lr", type=float, default=0.8)
    ap.add_argument("--lstm-per-round", type=int, default=4)
    ap.add_argument("--rotation", choices=("none", "hadamard"), default="none",
                    help="FD arms: randomized Hadamard rotation before quantizing, both directions")
    ap.add_argument("--down-rounding", choices=("nearest", "stochastic"), default="nearest",
                    help="FD arms: rounding of the broadcast quantizer (uploads are always stochastic)")
    ap.add_argument("--scaling", choices=SCALINGS, default="none",
                    help="FD arms: inverted dropout during local training, kept inputs scaled by units/kept "
                         "(feedforward: not the recurrent kernels; fd.input_scales)")
    ap.add_argument("--server-lr", type=float, default=1.0, help="server learning rate, every arm")
    ap.add_argument("--server-momentum", type=float, default=0.0, help="server momentum (FedAvgM), every arm")
    ap.add_argument("--fd-server-lr", type=float, default=None, help="FD arms' server lr (default: --server-lr)")
    ap.add_argument("--fd-server-momentum", type=float, default=None,
                    help="FD arms' server momentum (default: --server-momentum)")
    ap.add_argument("--fd-lr", type=float, default=None, help="FD arms' client lr (default: the task's)")
    ap.add_argument("--eval-last", type=int, default=1,
                    help="also report accuracy as the mean over the last N rounds; the rounds-to-target "
                         "target and test then use that N-round mean")
    args = ap.parse_args(argv)
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/fd_caldas.py", *(argv or sys.argv[1:])])
    seeds = [0] if args.quick else list(range(args.seeds))
    arms = [Arm(FP32.name, 1.0, None, None, server_lr=args.server_lr, server_momentum=args.server_momentum)]
    arms += parse_arms(args.arms, args.rotation, args.down_rounding, scaling=args.scaling, lr=args.fd_lr,
                       server_lr=args.server_lr if args.fd_server_lr is None else args.fd_server_lr,
                       server_momentum=(args.server_momentum if args.fd_server_momentum is None
                                        else args.fd_server_momentum))
    if args.eval_last < 1:
        raise SystemExit(f"--eval-last must be >= 1, got {args.eval_last}")
    bad = set(args.tasks.split(",")) - {"cnn", "lstm"}
    if bad:
        raise SystemExit(f"--tasks: unknown task(s) {sorted(bad)}; choose from cnn, lstm")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    log = lambda m: print(f"[{time.perf_counter() - t_start:6.0f}s] {m}", flush=True)  # noqa: E731
    settings, rows, omc_rows = {}, [], []
    paper = [c for arm in arms[1:] for c in paper_size_costs(arm)]
    for c in paper:
        log(f"paper-size {c['model']} {c['arm']}: down {c['down_ratio']}x up {c['up_ratio']}x "
            f"FLOPs {c['flops_ratio']}x")

    def save(done: bool) -> None:
        load["end"] = [round(x, 2) for x in os.getloadavg()]
        out.write_text(json.dumps({
            "command": cmd, "complete": done, "loadavg": load, "cpu_count": os.cpu_count(), "torch_threads": 1,
            "wall_s": round(time.perf_counter() - t_start, 1), "settings": settings,
            "summary": summarize(rows) if rows else [], "rows": rows,
            "omc_transform_lstm": omc_rows, "paper_size_per_client": paper}, indent=1))

    for name in args.tasks.split(","):
        for seed in seeds:
            task = make_task(name, args, seed)
            s = task.s
            settings[name] = {**asdict(s), "params": sum(int(math.prod(sh)) for _, sh in task.layout.shapes)}
            base, final = run_arm(task, arms[0], seed, target=None, log=log)
            rows.append(base)
            if name == "lstm":
                omc_rows.extend(omc_transform_rows(task, final, seed))
                log(f"lstm seed={seed} omc transform: " + ", ".join(
                    f"int{r['bits']} {'per-variable' if r['per_variable'] else 'shared'} {r['accuracy']:.4f}"
                    for r in omc_rows[-4:]) + f" (fp32 {omc_rows[-1]['fp32_accuracy']:.4f})")
            for arm in arms[1:]:
                rows.append(run_arm(task, arm, seed, target=base["accuracy_last_k"] - 0.01, log=log)[0])
            save(False)
    save(True)
    for s in summarize(rows):
        print(json.dumps({k: v for k, v in s.items() if not k.endswith("_mean")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
