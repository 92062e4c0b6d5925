"""Micro-benchmarks behind workers/conv_kernels.py: the kernels and layouts of the efficiency
task's CNN (conv5x5(32)-pool-conv5x5(64)-pool-fc(512)-fc(10), Fashion-MNIST) on one CPU thread.

    python benchmarks/conv_levers.py [--json PATH] [--reps 5]

Every figure is the median CPU time (`time.thread_time`, so other processes on a shared
machine cost less than in wall time) of `--reps` alternating repeats after one warm-up, with the
FLOP rate it gives (24.6 MFLOP per image forward, three times that to train).

- eval: 1,024 test images forward, per layout (NCHW default, channels_last, oneDNN blocked via
  `conv_kernels.fast_eval_model`) and batch size.
- train: 8 clients of 60 real images, 6 SGD steps at batch 10 each, NCHW against channels_last
  conv weights (the max difference of the trained weights is printed too).
- conv2: the second convolution's forward and backward for 10 clients x 10 images: per client,
  one weight shared by all 100 images (the ceiling of one big convolution), a grouped convolution
  (groups = clients), and im2col (`F.unfold`) + `torch.bmm` with per-client weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FWD_FLOP = 24.6e6


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10))


def _time(variants: dict, reps: int) -> dict[str, list[float]]:
    for f in variants.values():
        f()
    out = {k: [] for k in variants}
    for _ in range(reps):
        for k, f in variants.items():
            t = time.thread_time()
            f()
            out[k].append(time.thread_time() - t)
    return out


def _report(title: str, times: dict, flop: float, unit: float = 1.0, unit_name: str = "") -> dict:
    print(title)
    rows = {}
    for k, v in times.items():
        m = statistics.median(v)
        rows[k] = {"cpu_s": m, "min_s": min(v), "max_s": max(v), "gflops": flop / m / 1e9}
        print(f"  {k:22s} {m * 1e3 / unit:8.1f} ms{unit_name}  {flop / m / 1e9:6.1f} GFLOP/s  "
              f"(spread {min(v) * 1e3 / unit:.0f}-{max(v) * 1e3 / unit:.0f})")
    return rows


def bench_eval(reps: int, n: int = 1024) -> dict:
    from fedray.workers.conv_kernels import fast_eval_model

    torch.manual_seed(0)
    m = _model().eval()
    x = torch.randn(n, 1, 28, 28)
    mcl = _model().eval()
    mcl.load_state_dict(m.state_dict())
    mcl = mcl.to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    fast = fast_eval_model(m)

    def run(f, xx, bs):
        with torch.inference_mode():
            for i in range(0, len(xx), bs):
                f(xx[i : i + bs])

    v = {}
    for bs in (32, 128, 512):
        v[f"NCHW batch {bs}"] = lambda bs=bs: run(m, x, bs)
        v[f"channels_last {bs}"] = lambda bs=bs: run(mcl, xcl, bs)
        if fast is not None:
            v[f"oneDNN {bs}"] = lambda bs=bs: run(fast, x, bs)
    big = torch.randn(4096, 1, 28, 28)  # batch 4096 (the plain loop's) needs 4096 images to show its cache misses
    v["NCHW batch 4096"] = lambda: run(m, big, 4096)
    t = _time(v, reps)
    t["NCHW batch 4096"] = [s * n / 4096 for s in t["NCHW batch 4096"]]  # per n images
    return _report(f"eval: {n} images forward (CPU time per {n} images)", t, n * FWD_FLOP)


def bench_train(reps: int, clients: int = 8) -> dict:
    from fedray.workers.data import load_dataset

    d = load_dataset("fashion-mnist", None)
    torch.manual_seed(0)
    m = _model()
    g0 = {k: v.clone() for k, v in m.state_dict().items()}
    xs = torch.from_numpy(d.x_train[: clients * 60].astype(np.float32) * np.float32(d.scale)
                          + np.float32(d.shift)).reshape(clients, 60, 1, 28, 28)
    ys = torch.from_numpy(d.y_train[: clients * 60].astype(np.int64)).reshape(clients, 60)
    lf = nn.CrossEntropyLoss()

    def train(model):
        out = []
        for c in range(clients):
            model.load_state_dict(g0)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for i in range(0, 60, 10):
                opt.zero_grad(set_to_none=True)
                lf(model(xs[c, i : i + 10]), ys[c, i : i + 10]).backward()
                opt.step()
            out.append({k: v.clone() for k, v in model.state_dict().items()})
        return out

    mcl = _model().to(memory_format=torch.channels_last)
    a, b = train(m), train(mcl)
    diff = max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)
    t = _time({"NCHW weights": lambda: train(m), "channels_last weights": lambda: train(mcl)}, reps)
    rows = _report(f"train: {clients} clients x 60 images, batch 10 (CPU time per client)", t,
                   clients * 60 * 3 * FWD_FLOP, unit=clients, unit_name="/client")
    print(f"  max |difference| of the trained weights: {diff:.2e}")
    return {"rows": rows, "max_abs_diff": diff}


def bench_conv2(reps: int, b: int = 10, n: int = 10) -> dict:
    torch.manual_seed(0)
    x = torch.randn(b, n, 32, 14, 14)
    w = torch.randn(b, 64, 32, 5, 5) * 0.05
    bias = torch.zeros(b, 64)
    gy = torch.randn(b, n, 64, 14, 14)

    def per_client(cl: bool):
        for i in range(b):
            wi = w[i].clone()
            wi = (wi.contiguous(memory_format=torch.channels_last) if cl else wi).requires_grad_(True)
            F.conv2d(x[i].clone().requires_grad_(True), wi, bias[i], padding=2).backward(gy[i])

    def shared():
        xi = x.reshape(b * n, 32, 14, 14).clone().requires_grad_(True)
        F.conv2d(xi, w[0].clone().requires_grad_(True), bias[0], padding=2).backward(gy.reshape(b * n, 64, 14, 14))

    def grouped():
        xi = x.transpose(0, 1).reshape(n, b * 32, 14, 14).clone().requires_grad_(True)
        wi = w.reshape(b * 64, 32, 5, 5).clone().requires_grad_(True)
        F.conv2d(xi, wi, bias.reshape(-1), padding=2, groups=b).backward(gy.transpose(0, 1).reshape(n, b * 64, 14, 14))

    def im2col():  # forward, weight gradient and input gradient as three batched GEMMs
        cols = F.unfold(x.reshape(b * n, 32, 14, 14), 5, padding=2).reshape(b, n, 800, 196)
        cols = cols.transpose(1, 2).reshape(b, 800, n * 196)
        wm = w.reshape(b, 64, 800)
        torch.baddbmm(bias.unsqueeze(2), wm, cols)
        g = gy.transpose(1, 2).reshape(b, 64, n * 196)
        torch.bmm(g, cols.transpose(1, 2))
        gc = torch.bmm(wm.transpose(1, 2), g).reshape(b, 800, n, 196).transpose(1, 2).reshape(b * n, 800, 196)
        F.fold(gc, (14, 14), 5, padding=2)

    flop = 3 * 2 * b * n * 196 * 64 * 800
    t = _time({"per client, NCHW": lambda: per_client(False), "per client, CL weight": lambda: per_client(True),
               "one shared weight": shared, "grouped (groups=B)": grouped, "im2col + bmm": im2col}, reps)
    return _report(f"conv2 forward+backward, {b} clients x {n} images", t, flop)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    out = {"eval": bench_eval(a.reps), "train": bench_train(a.reps), "conv2": bench_conv2(a.reps),
           "load_before": load0, "load_after": os.getloadavg(), "torch": torch.__version__,
           "command": "python benchmarks/conv_levers.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"load {load0[0]:.1f} -> {out['load_after'][0]:.1f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
