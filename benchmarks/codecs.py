"""Codec microbenchmark: every registered codec on 32M float32 values (compression.md E, F5).

    python benchmarks/codecs.py --json benchmarks/results/codecs.json [--quick] [--repeats 5]

Each row: codec (registry name + params), bits_per_value from the bytes actually produced,
formula_bits (compression.md's wire formula), rel_error (relative L2), encode_gbps and
decode_gbps (float32 bytes per second, the median of the repeats, with `*_spread` = [min, max]
over them), roundtrip_gbps (4d / (median encode + median decode time)), memcpy_gbps (np.copyto,
median of repeats taken just before each codec's timings, so the ratio is side by side) and the
load average when the row was taken. The JSON also records the CPU model (/proc/cpuinfo), the
number of CPUs, the load average before and after, and the exact command.

decode_gbps is `Codec.decode_into` a preallocated float32 buffer, reused across repeats: what the
aggregation service does with every upload (one staging buffer per tensor, see
orchestrator/service.py). decode_fresh_gbps and roundtrip_fresh_gbps are `Codec.decode`, which
allocates its output: a fresh 128 MiB array costs about 10 ms of first-touch page faults here
(the kernel zeroes it) before the codec writes a byte, so every codec's fresh decode is capped
near memcpy / 2 whatever its arithmetic. Both are printed against the targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from fedray.compression import CodecContext, get_codec

_EF_BITS = lambda d, k: k * (32 + math.log2(d / k) + 2) / d  # noqa: E731  D.7, delta-coded


def _cases(n: int):
    """(label, codec name, params, shape, formula bits per value)."""
    mat = (4096, n // 4096)
    small = (1024, 1024)
    k01 = math.ceil(0.01 * n)
    return [
        ("identity", "identity", {}, (n,), 32.0),
        ("fp16", "fp16", {}, (n,), 16.0),
        ("bf16", "bf16", {}, (n,), 16.0),
        ("int8", "int8", {}, (n,), 8 + 32 / n),
        ("uniform8", "uniform", {"bits": 8}, (n,), 8 + 64 / n),
        ("uniform8-stoch", "uniform", {"bits": 8, "rounding": "stochastic"}, (n,), 8 + 64 / n),
        ("uniform4-block", "uniform", {"bits": 4, "mode": "symmetric", "granularity": "block", "block": 4096}, (n,), 4 + 32 / 4096),
        ("uniform2", "uniform", {"bits": 2}, (n,), 2 + 64 / n),
        ("uniform3", "uniform", {"bits": 3}, (n,), 3 + 64 / n),
        ("int4", "int4", {}, (n,), 4 + 32 / 64),
        ("qsgd-s7", "qsgd", {"levels": 7}, (n,), 4 + 32 / 512),
        ("qsgd-s1", "qsgd", {"levels": 1}, (n,), 2 + 32 / 512),
        ("terngrad", "terngrad", {}, (n,), 2 + 32 / n),
        ("sign", "sign", {}, (n,), 1.0),
        ("scaled_sign", "scaled_sign", {}, (n,), 1 + 32 / n),
        ("topk-exact-1%", "topk", {"ratio": 0.01}, (n,), _EF_BITS(n, k01)),
        ("topk-sampled-1%", "topk", {"ratio": 0.01, "method": "sampled"}, (n,), _EF_BITS(n, k01)),
        ("threshold-99%", "threshold", {"drop": 0.99}, (n,), _EF_BITS(n, k01)),
        ("randomk-1%", "randomk", {"ratio": 0.01}, (n,), 32 * k01 / n),
        ("powersgd-r4", "powersgd", {"rank": 4}, mat, 32 * 4 * sum(mat) / n),
        ("atomo-s4", "atomo", {"budget": 4}, small, 32 * 4 * (sum(small) + 1) / math.prod(small)),
        ("blockwise8", "blockwise8", {}, (n,), 8 + 32 / 4096),
        ("nf4", "nf4", {}, (n,), 4 + 32 / 64),
        ("zstd(int8)", "zstd", {"inner": "int8", "level": 1}, (n,), None),
        ("ef(scaled_sign)", "ef", {"inner": "scaled_sign"}, (n,), 1 + 32 / n),
        ("pipeline(topk,uniform8,zstd)", "pipeline", {"stages": [{"codec": "topk", "ratio": 0.01, "method": "sampled"}, {"codec": "uniform", "bits": 8}, "zstd"]}, (n,), None),
        ("p2u-4+4+8", "p2u", {}, (n,), 16 + 64 / 4096),
    ]


def _timed(fn, repeats: int, budget_s: float = 20.0):
    """(median seconds, [min, max] seconds, last output) over `repeats` calls (fewer once
    `budget_s` is spent), after one untimed warm-up call."""
    out, times, spent = fn(), [], 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        times.append(dt)
        spent += dt
        if spent > budget_s:
            break
    return statistics.median(times), (min(times), max(times)), out


def _gbps(nbytes: int, t: float) -> float:
    return round(nbytes / t / 1e9, 3)


def _spread(nbytes: int, mm: tuple[float, float]) -> list[float]:
    return [_gbps(nbytes, mm[1]), _gbps(nbytes, mm[0])]


def memcpy_timed(n: int, repeats: int):
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    b = np.empty_like(a)
    return _timed(lambda: np.copyto(b, a), max(repeats, 5))


def memcpy_gbps(n: int, repeats: int) -> float:
    return 4 * n / memcpy_timed(n, repeats)[0] / 1e9


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(n: int, repeats: int, only: list[str] | None = None) -> list[dict]:
    rows = []
    for label, name, params, shape, formula in _cases(n):
        if only and label not in only:
            continue
        d = math.prod(shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        codec = get_codec(name, **params)
        ctx = CodecContext(seed=1, key="bench")
        t_mem, mm_mem, _ = memcpy_timed(n, repeats)  # beside this codec's timings
        t_enc, mm_enc, p = _timed(lambda: codec.encode(x, ctx), repeats)
        t_fresh, mm_fresh, y = _timed(lambda: codec.decode(p, ctx), repeats)
        buf = torch.empty(shape).fill_(0.0)  # touched once, like a server's reused staging buffer
        t_dec, mm_dec, _ = _timed(lambda: codec.decode_into(p, buf, ctx), repeats)
        bits = 8 * p.nbytes / d
        row = {
            "codec": label, "name": name, "params": params, "numel": d,
            "bits_per_value": round(bits, 4),
            "formula_bits": None if formula is None else round(formula, 4),
            "bits_vs_formula": None if formula is None else round(bits / formula - 1, 4),
            "rel_error": round(float((y - x).norm() / x.norm()), 5),
            "encode_gbps": _gbps(4 * d, t_enc), "encode_gbps_spread": _spread(4 * d, mm_enc),
            "decode_gbps": _gbps(4 * d, t_dec), "decode_gbps_spread": _spread(4 * d, mm_dec),
            "roundtrip_gbps": _gbps(4 * d, t_enc + t_dec),
            "roundtrip_gbps_spread": [_gbps(4 * d, mm_enc[1] + mm_dec[1]), _gbps(4 * d, mm_enc[0] + mm_dec[0])],
            "decode_fresh_gbps": _gbps(4 * d, t_fresh), "decode_fresh_gbps_spread": _spread(4 * d, mm_fresh),
            "roundtrip_fresh_gbps": _gbps(4 * d, t_enc + t_fresh),
            "memcpy_gbps": _gbps(4 * n, t_mem), "memcpy_gbps_spread": _spread(4 * n, mm_mem),
            "repeats": repeats,
            # Other jobs on a shared 2-core box skew everything: keep the load beside the figures.
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        }
        row["roundtrip_vs_memcpy"] = round(row["roundtrip_gbps"] / row["memcpy_gbps"], 4)
        rows.append(row)
        print(_fmt(row), flush=True)
        del x, p, y, buf
    return rows


TARGETS = {  # codec label -> (metric, fraction of memcpy), from the issue
    "int8": ("roundtrip_gbps", 0.25),
    "int4": ("roundtrip_gbps", 0.12),
    "uniform4-block": ("roundtrip_gbps", 0.12),
    "sign": ("roundtrip_gbps", 0.5),
    "topk-sampled-1%": ("encode_gbps", 0.2),
}

_HEAD = (f"{'codec':30s} {'bits':>8s} {'formula':>8s} {'rel_err':>8s} {'enc GB/s':>9s} {'dec GB/s':>9s} "
         f"{'rt GB/s':>8s} {'rt/memcpy':>9s} {'fresh dec':>9s} {'fresh rt/m':>10s}")


def _fmt(r: dict) -> str:
    f = "-" if r["formula_bits"] is None else f"{r['formula_bits']:.3f}"
    return (f"{r['codec']:30s} {r['bits_per_value']:8.3f} {f:>8s} {r['rel_error']:8.4f} {r['encode_gbps']:9.3f} "
            f"{r['decode_gbps']:9.3f} {r['roundtrip_gbps']:8.3f} {r['roundtrip_gbps'] / r['memcpy_gbps']:9.3f} "
            f"{r['decode_fresh_gbps']:9.3f} {r['roundtrip_fresh_gbps'] / r['memcpy_gbps']:10.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results to this path")
    ap.add_argument("--quick", action="store_true", help="1M values instead of 32M")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per figure (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--only", nargs="*", help="codec labels to run")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(a.threads)
    n = (1 << 20) if a.quick else (32 << 20)
    load0 = os.getloadavg()
    print(f"{n} float32 values, {a.threads} thread(s), {cpu_model()}, {os.cpu_count()} CPUs, "
          f"load {' '.join(f'{v:.2f}' for v in load0)}; medians of {a.repeats} repeats")
    print(_HEAD)
    rows = run(n, a.repeats, a.only)
    targets = []
    for r in rows:
        if r["codec"] in TARGETS:
            metric, frac = TARGETS[r["codec"]]
            got = r[metric] / r["memcpy_gbps"]
            targets.append({"codec": r["codec"], "metric": metric, "fraction_of_memcpy": round(got, 4),
                            "target": frac, "met": got >= frac})
            line = f"target {r['codec']:18s} {metric} >= {frac:.2f} x memcpy: {got:.3f} x  {'MET' if got >= frac else 'MISSED'}"
            if metric == "roundtrip_gbps":
                fresh = r["roundtrip_fresh_gbps"] / r["memcpy_gbps"]
                line += f"   (with a fresh decode output: {fresh:.3f} x, {'met' if fresh >= frac else 'missed'})"
            print(line)
    if a.json:
        out = {
            "cpu_model": cpu_model(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "numel": n, "threads": a.threads, "repeats": a.repeats,
            "load_before": list(load0), "load_after": list(os.getloadavg()),
            "command": "python benchmarks/codecs.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "targets": targets, "rows": rows,
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
