"""OMC training speed and parameter memory against fp32 SGD on the same model (docs/fd_omc.md).

    python benchmarks/omc_speed.py --json benchmarks/results/omc_speed.json
    python benchmarks/omc_speed.py --models mlp lstm --repeats 5 --json /tmp/omc.json

For each model, two copies with the same initial weights: one trained with torch.optim.SGD on
fp32 parameters, one wrapped as `OMCModel(model, OMCConfig(bits=8, stochastic=True))` (int8 +
stochastic rounding; `om.step(lr)`). Steps alternate between the two (fp32 first on even
repeats, OMC first on odd ones), after one untimed warm-up step each; the figures are medians
over the repeats (201 for the MLP, 21 for the LSTM, 5 for the transformer by default; the
10th percentiles are recorded too, as the machine is shared). --omc-from times an earlier
OMC implementation on the same models (before/after). Torch threads are fixed (--threads, default 1). Models:

- mlp: the Fashion-MNIST MLP of workers/models.py (kind mlp, 784-200-200-10), batch 32
  (mlp-b256: the same at batch 256);
- lstm: the Shakespeare LSTM of Caldas et al. / LEAF (benchmarks/lm_models.py), batch 10 of
  80 characters;
- lm: a decoder-only transformer of about 110M parameters (benchmarks/lm_models.py), batch 4 of
  64 tokens.

Inputs are random (features / character / token ids from a seeded generator): step time does
not depend on the data. Each row: model, params, fp32_step_s, omc_step_s, fp32_param_bytes,
omc_param_bytes (stored + peak transient, measured), the parts of the latter, the ratio, the
targets and the command; the run records torch's thread count and os.getloadavg() before and
after each model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_models import CharLSTM, DecoderLM, num_params  # noqa: E402

from fedray.compression.omc import OMCConfig, OMCModel  # noqa: E402
from fedray.workers.models import build_model  # noqa: E402

MODELS = ("mlp", "mlp-b256", "lstm", "lm")
REPEATS = {"mlp": 201, "mlp-b256": 51, "lstm": 21, "lm": 5}  # ms-scale steps need many alternations
TIME_RATIO_TARGET = 1.3
MEMORY_SAVING_TARGET = 0.59  # on the >= 100M-parameter model


def _case(name: str, gen: torch.Generator, quick: bool):
    """(model, make_batch() -> (x, y), loss(out, y), batch description)."""
    if name in ("mlp", "mlp-b256"):
        b = 32 if name == "mlp" else 256
        model = build_model("mlp", (28, 28), 10, (200, 200))
        return model, lambda: (torch.rand(b, 28, 28, generator=gen), torch.randint(0, 10, (b,), generator=gen)), \
            nn.functional.cross_entropy, f"batch {b} of 28x28"
    if name == "lstm":
        model = CharLSTM()
        return model, lambda: (torch.randint(0, 80, (10, 80), generator=gen), torch.randint(0, 80, (10,), generator=gen)), \
            nn.functional.cross_entropy, "batch 10 x 80 characters"
    if name == "lm":
        model = DecoderLM(layers=2 if quick else 12, context=64)
        vocab = model.head.out_features

        def batch():
            t = torch.randint(0, vocab, (4, 65), generator=gen)
            return t[:, :-1], t[:, 1:]

        return model, batch, lambda out, y: nn.functional.cross_entropy(out.reshape(-1, vocab), y.reshape(-1)), \
            "batch 4 x 64 tokens"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def load_omc(directory: str):
    """(OMCModel, OMCConfig) from the `compression` package in `directory` (an earlier fedray,
    e.g. `mkdir -p /tmp/before && git archive bca3d82 compression | tar -x -C /tmp/before`)."""
    pkg = os.path.join(directory, "compression")
    spec = importlib.util.spec_from_file_location("omc_baseline", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["omc_baseline"] = mod
    spec.loader.exec_module(mod)
    omc = importlib.import_module("omc_baseline.omc")
    return omc.OMCModel, omc.OMCConfig


def _quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))]


def run_model(name: str, repeats: int, lr: float, seed: int, quick: bool, cfg, omc_model=OMCModel) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, make_batch, loss_fn, desc = _case(name, gen, quick)
    params = num_params(model)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    load_before = os.getloadavg()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    t0 = time.perf_counter()
    om = omc_model(model, cfg, seed=seed)
    wrap_s = time.perf_counter() - t0

    def fp32_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(ref(x), y).backward()
        opt.step()

    def omc_step(x, y):
        loss_fn(om.model(x), y).backward()
        om.step(lr)

    cpu = {"fp32": [], "omc": []}

    def timed(fn, x, y):
        t, c = time.perf_counter(), time.thread_time()
        fn(x, y)
        cpu["fp32" if fn is fp32_step else "omc"].append(time.thread_time() - c)
        return time.perf_counter() - t

    x, y = make_batch()
    timed(fp32_step, x, y), timed(omc_step, x, y)  # warm-up (allocator, workspace)
    fp32_t, omc_t = [], []
    cpu["fp32"].clear(), cpu["omc"].clear()
    for r in range(repeats):
        x, y = make_batch()
        if r % 2 == 0:
            fp32_t.append(timed(fp32_step, x, y))
            omc_t.append(timed(omc_step, x, y))
        else:
            omc_t.append(timed(omc_step, x, y))
            fp32_t.append(timed(fp32_step, x, y))
        if repeats <= 25:
            print(f"  {name} repeat {r}: fp32 {fp32_t[-1]:.4f} s  omc {omc_t[-1]:.4f} s", flush=True)
    fs, os_ = statistics.median(fp32_t), statistics.median(omc_t)
    fc, oc = statistics.median(cpu["fp32"]), statistics.median(cpu["omc"])
    omc_bytes = om.param_memory_bytes()
    row = {
        "model": name, "params": params, "batch": desc,
        "fp32_step_s": round(fs, 6), "omc_step_s": round(os_, 6), "time_ratio": round(os_ / fs, 3),
        "fp32_param_bytes": fp32_bytes, "omc_param_bytes": omc_bytes,
        "omc_stored_bytes": om.stored_bytes(), "omc_peak_transient_bytes": om.peak_transient_bytes(),
        "omc_rounding_scratch_bytes": om.scratch_bytes() if hasattr(om, "scratch_bytes") else None,
        "memory_saving": round(1 - omc_bytes / fp32_bytes, 4),
        "quantized_fraction": round(sum(q.n for q in om.q.values()) / params, 4),
        "omc_block_bytes": getattr(om, "block_bytes", cfg.block_bytes), "omc_wrap_s": round(wrap_s, 3),
        "fp32_step_cpu_s": round(fc, 6), "omc_step_cpu_s": round(oc, 6), "time_ratio_cpu": round(oc / fc, 3),
        "time_target_met_cpu": oc <= TIME_RATIO_TARGET * fc,
        "repeats": repeats, "fp32_step_p10_s": round(_quantile(fp32_t, 0.1), 6), "omc_step_p10_s": round(_quantile(omc_t, 0.1), 6),
        "fp32_step_times_s": [round(t, 6) for t in fp32_t[:25]], "omc_step_times_s": [round(t, 6) for t in omc_t[:25]],
        "time_target_met": os_ <= TIME_RATIO_TARGET * fs,
        "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }
    if params >= 100_000_000:
        row["memory_target_met"] = row["memory_saving"] >= MEMORY_SAVING_TARGET
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--models", nargs="*", default=["mlp", "lstm", "lm"], choices=MODELS)
    ap.add_argument("--repeats", type=int, default=None, help=f"alternating steps per model (default {REPEATS})")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-bytes", type=int, default=None, help="OMCConfig.block_bytes (default: automatic)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer transformer instead of 12 layers")
    ap.add_argument("--omc-from", metavar="DIR", help="time the OMC of an earlier fedray: DIR holds its compression/ package")
    a = ap.parse_args(argv)
    if a.repeats is not None and a.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(a.threads)
    omc_model, omc_config = load_omc(a.omc_from) if a.omc_from else (OMCModel, OMCConfig)
    cfg = omc_config(bits=8, stochastic=True, **({"block_bytes": a.block_bytes} if a.block_bytes else {}))
    command = " ".join([os.path.basename(sys.executable) if False else "python"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()}")
    rows = []
    for name in a.models:
        row = run_model(name, a.repeats or REPEATS[name], a.lr, a.seed, a.quick, cfg, omc_model)
        row["command"] = command
        rows.append(row)
        print(f"{name}: {row['params']:,} params  fp32 {row['fp32_step_s']:.4f} s  omc {row['omc_step_s']:.4f} s  "
              f"ratio {row['time_ratio']:.2f} (target <= {TIME_RATIO_TARGET}: {'MET' if row['time_target_met'] else 'MISSED'}; "
              f"CPU time {row['omc_step_cpu_s']:.4f} / {row['fp32_step_cpu_s']:.4f} s = {row['time_ratio_cpu']:.2f})  "
              f"memory {row['omc_param_bytes']:,} / {row['fp32_param_bytes']:,} B = {100 * row['memory_saving']:.1f}% saved"
              + (f" (target >= 59%: {'MET' if row['memory_target_met'] else 'MISSED'})" if "memory_target_met" in row else ""),
              flush=True)
    if a.json:
        out = {"command": command, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "omc_config": {"bits": cfg.bits, "stochastic": cfg.stochastic, "block_bytes": cfg.block_bytes},
               "rows": rows}
        if os.path.exists(a.json):  # keep sections written by other runs (e.g. codec_speed)
            with open(a.json) as f:
                old = json.load(f)
            out = {**{k: v for k, v in old.items() if k not in out}, **out}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
