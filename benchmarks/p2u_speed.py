"""P2U, blockwise8, nf4 and 3-bit uniform encode / decode speed on a 110M-parameter model.

    python benchmarks/p2u_speed.py --json benchmarks/results/p2u_speed.json [--repeats 5]

Every tensor of a randomly initialised decoder-only transformer (benchmarks/lm_models.py,
110M parameters, 441 MB of fp32) goes through each codec; a pass is the whole model, timed
as one (GB/s = fp32 input bytes / seconds). P2U is the progressive API of
fedray.compression.p2u: `encode_stages` (stages 4+4+8 bits, block 4096) and `decode_stages`
of every stage; the others are registry codecs, `encode` and `decode` (fresh output). Figures:
best and median of the repeats (wall clock), and the median over the thread's CPU time
(time.thread_time: the development machine runs many jobs on 2 cores), single torch thread,
load average recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_models import DecoderLM, num_params  # noqa: E402

from fedray.compression import get_codec  # noqa: E402
from fedray.compression.p2u import P2UConfig, decode_stages, encode_stages  # noqa: E402

TARGET_GBPS = 0.5


def _cases():
    cfg = P2UConfig(stage_bits=(4, 4, 8))
    yield "p2u-4+4+8", (lambda t: encode_stages(t, cfg=cfg)), decode_stages, {"stage_bits": [4, 4, 8], "block": 4096}
    for label, name, params in (("blockwise8", "blockwise8", {}), ("nf4", "nf4", {}), ("uniform3", "uniform", {"bits": 3})):
        codec = get_codec(name, **params)
        yield label, codec.encode, codec.decode, {"codec": name, **params}


def run(tensors: list[torch.Tensor], repeats: int) -> list[dict]:
    nbytes = sum(4 * t.numel() for t in tensors)
    rows = []
    for label, enc, dec, params in _cases():
        te, td, ce, cd, payloads = [], [], [], [], None
        for _ in range(repeats):
            payloads = None
            t0, c0 = time.perf_counter(), time.thread_time()
            payloads = [enc(t) for t in tensors]
            t1, c1 = time.perf_counter(), time.thread_time()
            out = [dec(p) for p in payloads]
            t2, c2 = time.perf_counter(), time.thread_time()
            te.append(t1 - t0)
            td.append(t2 - t1)
            ce.append(c1 - c0)
            cd.append(c2 - c1)
            del out
        wire = sum(sum(s.nbytes for s in p) if isinstance(p, list) else p.nbytes for p in payloads)
        row = {
            "codec": label, "params": params, "fp32_bytes": nbytes, "wire_bytes": wire,
            "encode_gbps_best": round(nbytes / min(te) / 1e9, 3), "decode_gbps_best": round(nbytes / min(td) / 1e9, 3),
            "encode_gbps_median": round(nbytes / statistics.median(te) / 1e9, 3),
            "decode_gbps_median": round(nbytes / statistics.median(td) / 1e9, 3),
            "encode_gbps_cpu": round(nbytes / statistics.median(ce) / 1e9, 3),
            "decode_gbps_cpu": round(nbytes / statistics.median(cd) / 1e9, 3),
            "encode_s": [round(t, 4) for t in te], "decode_s": [round(t, 4) for t in td],
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        }
        row["target_met"] = min(row["encode_gbps_median"], row["decode_gbps_median"]) >= TARGET_GBPS
        row["target_met_cpu"] = min(row["encode_gbps_cpu"], row["decode_gbps_cpu"]) >= TARGET_GBPS
        rows.append(row)
        print(f"{label:12s} encode {row['encode_gbps_median']:.3f} GB/s (best {row['encode_gbps_best']:.3f})  "
              f"decode {row['decode_gbps_median']:.3f} GB/s (best {row['decode_gbps_best']:.3f})  "
              f"CPU time: {row['encode_gbps_cpu']:.3f} / {row['decode_gbps_cpu']:.3f} GB/s  "
              f"{8 * wire / (nbytes / 4):.2f} bits/value  target >= {TARGET_GBPS}: {'MET' if row['target_met'] else 'MISSED'} "
              f"(CPU time: {'MET' if row['target_met_cpu'] else 'MISSED'})",
              flush=True)
        del payloads
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (12: 110M parameters)")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = DecoderLM(layers=a.layers, context=64)
    tensors = [p.detach() for p in model.parameters()]
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"{num_params(model):,} parameters in {len(tensors)} tensors, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()}")
    rows = run(tensors, a.repeats)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "model_params": num_params(model), "tensors": len(tensors),
                       "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
