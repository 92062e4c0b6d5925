"""Load on the aggregation service: M client processes stream updates to 1..S shards.

    python benchmarks/aggregation_load.py --json benchmarks/results/aggregation_load.json [--reps 3]

Each shard is fedray's real service (`AggregationCore` behind `create_server`) in its own
process; clients are separate processes using fedray's upload path (`upload_with_retry`: chunked
stream, digest, retry on RESOURCE_EXHAUSTED). `raw_grpc_mbps` is plain grpcio streaming of the
same chunks to a server that only counts bytes, measured in the same run (the target's baseline).
fedray sends an update of one message (the default 1M int8 values) in one unary call
(UploadOne); `raw_unary` is plain grpcio sending that message in a unary call, measured in the
same alternation as context (`one_shard_fraction_of_raw_unary`). A last phase starts --burst
uploads at once (threads across the client processes) and counts errors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np

RAW_METHOD, RAW_UNARY_METHOD = "/fedray.bench.Raw/Up", "/fedray.bench.Raw/UpOne"


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _rss_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _shard_proc(kind: str, shard: tuple[int, int], numel: int, port_q, stop_evt, max_inflight: int,
                max_active: int) -> None:
    import grpc

    import torch

    from fedray.orchestrator.service import AggregationCore, ServiceLimits, create_server
    from fedray.proto import serde

    torch.set_num_threads(1)  # as the shard actor does (orchestrator/shard.py)
    if kind.startswith("raw"):
        def up(it, ctx):
            n = sum(len(b) for b in it)
            return n.to_bytes(8, "little")

        def up_one(b, ctx):
            return len(b).to_bytes(8, "little")

        # the same handler threads as fedray's server (create_server: max_inflight + 4)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_inflight + 4), options=serde.GRPC_OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "fedray.bench.Raw", {"Up": grpc.stream_unary_rpc_method_handler(up),
                                 "UpOne": grpc.unary_unary_rpc_method_handler(up_one)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    else:
        core = AggregationCore(job_id="load", secret="load-secret", shapes={"w": (numel // 1000, 1000)},
                               limits=ServiceLimits(max_inflight=max_inflight, max_active=max_active), shard=shard,
                               max_clients=1 << 20)
        core.open_round(1)
        server, port = create_server(core, "127.0.0.1:0")
    port_q.put(port)
    stop_evt.wait()
    server.stop(None).wait()
    _exit_now()


def _client_proc(kind: str, addrs: list[str], numel: int, codec: str, jobs: list[int], threads: int, out_q,
                 ready_q, go) -> None:
    import grpc
    import torch

    from fedray.compression import get_codec
    from fedray.proto import serde
    from fedray.proto.auth import client_token
    from fedray.workers.client import upload_with_retry

    torch.set_num_threads(1)
    x = torch.randn(numel // 1000, 1000)
    payload = get_codec(codec).encode(x)
    # One framed update; per upload only its header (client id) is new (serde.WireUpload).
    template = serde.encode_upload(job_id="load", round=1, client_id=0, weight=1.0, tensors=[("w", payload)])
    raw_chunks = [bytes(c) for c in template.chunks]
    chans = [serde.open_channel(a) for a in addrs]
    lat, errors, wire = [], 0, 0
    lock = threading.Lock()

    def one(cid: int) -> None:
        nonlocal errors, wire
        t0 = time.perf_counter()
        try:
            if kind == "raw_unary" and len(raw_chunks) == 1:
                chans[0].unary_unary(RAW_UNARY_METHOD)(raw_chunks[0], timeout=120)
                n = len(raw_chunks[0])
            elif kind.startswith("raw"):
                stub = chans[0].stream_unary(RAW_METHOD)
                stub(iter(raw_chunks), timeout=120)
                n = sum(len(c) for c in raw_chunks)
            else:
                header = type(template.header)()
                header.CopyFrom(template.header)
                header.client_id = cid
                update = template.with_header(header)
                ch = chans[serde.shard_index(cid, len(chans))]
                n = upload_with_retry(ch, update, client_token("load-secret", "load", cid), tries=50)["wire_bytes"]
            with lock:
                lat.append(time.perf_counter() - t0)
                wire += n
        except grpc.RpcError:
            with lock:
                errors += 1

    ex = futures.ThreadPoolExecutor(threads)
    list(ex.map(lambda _: None, range(threads)))  # threads started before the clock does
    ready_q.put(os.getpid())
    go.wait()
    t0 = os.times()
    list(ex.map(one, jobs))
    ex.shutdown()
    t1 = os.times()
    for c in chans:  # before exit: gRPC threads left running abort the interpreter's shutdown
        c.close()
    out_q.put({"lat": lat, "errors": errors, "wire": wire,
               "cpu_s": (t1.user - t0.user) + (t1.system - t0.system)})
    out_q.close()
    out_q.join_thread()  # the result is in the pipe
    _exit_now()


def _exit_now() -> None:
    """End a benchmark process without interpreter teardown: grpcio's C++ threads, destroyed
    there, sometimes abort it ("terminate called without an active exception") after its work
    and results are done, which is noise in the output."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_phase(kind: str, *, shards: int, clients: int, uploads: int, threads: int, numel: int, codec: str,
              max_inflight: int = 64, max_active: int = 0, id_base: int = 0) -> dict:
    ctx = mp.get_context("spawn")
    port_q, out_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    n_servers = 1 if kind.startswith("raw") else shards
    procs = [ctx.Process(target=_shard_proc, args=(kind, (i, n_servers), numel, port_q, stop, max_inflight, max_active))
             for i in range(n_servers)]
    for p in procs:
        p.start()
    ports = [port_q.get(timeout=120) for _ in procs]
    # shard i's port: the queue order is arbitrary, so ask each process's port by start order
    addrs = [f"127.0.0.1:{p}" for p in ports]
    if not kind.startswith("raw") and n_servers > 1:
        addrs = _order_by_shard(addrs, n_servers)
    ids = [id_base + i for i in range(uploads)]
    per = [ids[i::clients] for i in range(clients)]
    ready_q, go = ctx.Queue(), ctx.Event()
    cps = [ctx.Process(target=_client_proc, args=(kind, addrs, numel, codec, j, threads, out_q, ready_q, go))
           for j in per]
    for c in cps:
        c.start()
    for _ in cps:  # clients have imported, encoded and connected: start the clock
        ready_q.get(timeout=300)
    cpu0 = sum(_cpu_s(p.pid) for p in procs)
    t0 = time.perf_counter()
    go.set()
    res = [out_q.get(timeout=900) for _ in cps]
    wall = time.perf_counter() - t0
    shard_cpu = sum(_cpu_s(p.pid) for p in procs) - cpu0
    for c in cps:
        c.join()
    peak = max(_rss_peak(p.pid) for p in procs)
    stop.set()
    for p in procs:
        p.join(timeout=30)
    lat = np.array(sum((r["lat"] for r in res), [])) * 1000
    wire = sum(r["wire"] for r in res)
    return {
        "kind": kind, "shards": n_servers, "client_procs": clients, "threads_per_proc": threads, "uploads": uploads,
        "ingest_mbps": wire / wall / 1e6, "updates_per_s": len(lat) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "shard_peak_rss_bytes": peak, "errors": sum(r["errors"] for r in res), "wall_s": wall,
        # CPU over the measured window: what each side spent per update (the 2 cores are shared)
        "shard_cpu_ms_per_update": 1000 * shard_cpu / max(len(lat), 1),
        "client_cpu_ms_per_update": 1000 * sum(r["cpu_s"] for r in res) / max(len(lat), 1),
    }


def _order_by_shard(addrs: list[str], n: int) -> list[str]:
    """Find which address is which shard: a shard refuses clients of other shards, naming itself."""
    from fedray.proto import serde
    from fedray.proto.auth import client_token

    import grpc
    import torch

    from fedray.compression import get_codec

    order: list[str | None] = [None] * n
    for a in addrs:
        ch = serde.open_channel(a)
        for i in range(n):
            cid = next(c for c in range(10**6, 10**6 + 1000) if serde.shard_index(c, n) == i)
            msgs = serde.upload_messages(job_id="load", round=99, client_id=cid, weight=1.0,
                                         tensors=[("w", get_codec("identity").encode(torch.zeros(1)))])
            try:
                serde.call_upload(ch, msgs, token=client_token("load-secret", "load", cid))
            except grpc.RpcError as e:
                if "not shard" not in (e.details() or ""):
                    order[i] = a
        ch.close()
    if None in order:
        raise RuntimeError(f"could not map addresses to shards: {order}")
    return order  # type: ignore[return-value]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--numel", type=int, default=1_000_000, help="parameters per update")
    p.add_argument("--codec", default="int8")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--threads", type=int, default=4, help="concurrent uploads per client process")
    p.add_argument("--uploads", type=int, default=200)
    p.add_argument("--max-shards", type=int, default=2)
    p.add_argument("--burst", type=int, default=1000, help="uploads started at once in the last phase")
    p.add_argument("--burst-numel", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3, help="alternating raw / one-shard / raw unary repetitions")
    p.add_argument("--max-active", type=int, default=0, help="ServiceLimits.max_active (0: the number of CPUs)")
    a = p.parse_args(argv)
    common = dict(clients=a.clients, uploads=a.uploads, threads=a.threads, numel=a.numel, codec=a.codec,
                  max_active=a.max_active)
    # raw and one fedray shard alternate (the order flips every repetition): this shared machine's
    # speed drifts by tens of percent over minutes, so only same-time pairs compare.
    rows, pairs = [], []
    for rep in range(a.reps):
        pair = {}
        for kind in (("raw", "fedray", "raw_unary") if rep % 2 == 0 else ("raw_unary", "fedray", "raw")):
            r = run_phase(kind, shards=1, id_base=(10 + rep) * 10**6, **common)
            r["rep"] = rep
            pair[kind] = r
            rows.append(r)
        pair["fedray"]["raw_grpc_mbps"] = pair["raw"]["raw_grpc_mbps"] = pair["raw"]["ingest_mbps"]
        pair["raw_unary"]["raw_grpc_mbps"] = pair["raw"]["ingest_mbps"]
        pairs.append(pair)
        print(f"rep {rep + 1}/{a.reps}: raw {pair['raw']['ingest_mbps']:.0f} MB/s, one shard "
              f"{pair['fedray']['ingest_mbps']:.0f} MB/s ({pair['fedray']['ingest_mbps'] / pair['raw']['ingest_mbps']:.0%}), "
              f"raw unary {pair['raw_unary']['ingest_mbps']:.0f} MB/s",
              flush=True)
    raw = statistics.median(p["raw"]["ingest_mbps"] for p in pairs)
    for s in range(2, a.max_shards + 1):
        rows.append(run_phase("fedray", shards=s, id_base=s * 10**6, **common))
    burst = run_phase("fedray", shards=1, clients=a.clients, uploads=a.burst, threads=a.burst // a.clients,
                      numel=a.burst_numel, codec=a.codec, max_active=a.max_active, id_base=9 * 10**6)
    burst["phase"] = "burst"
    rows.append(burst)
    for r in rows:
        r.setdefault("raw_grpc_mbps", raw)
    ratios = [p["fedray"]["ingest_mbps"] / p["raw"]["ingest_mbps"] for p in pairs]
    unary = [p["fedray"]["ingest_mbps"] / p["raw_unary"]["ingest_mbps"] for p in pairs]
    out = {
        "rows": rows,
        "raw_grpc_mbps": raw,
        "one_shard_ingest_mbps": statistics.median(p["fedray"]["ingest_mbps"] for p in pairs),
        "one_shard_fraction_of_raw": statistics.median(ratios),
        "one_shard_fraction_of_raw_per_rep": ratios,
        "raw_unary_mbps": statistics.median(p["raw_unary"]["ingest_mbps"] for p in pairs),
        "one_shard_fraction_of_raw_unary": statistics.median(unary),
        "one_shard_fraction_of_raw_unary_per_rep": unary,
        "burst_errors": burst["errors"],
        "load": os.getloadavg(),
        "command": "python benchmarks/aggregation_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"{'kind':7} {'shards':>6} {'uploads':>7} {'MB/s':>8} {'upd/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'RSS MB':>8} {'err':>4} {'shard ms/upd':>12} {'client ms/upd':>13}")
    for r in rows:
        print(f"{r['kind']:7} {r['shards']:6d} {r['uploads']:7d} {r['ingest_mbps']:8.1f} {r['updates_per_s']:8.1f} "
              f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['shard_peak_rss_bytes'] / 1e6:8.1f} {r['errors']:4d} "
              f"{r['shard_cpu_ms_per_update']:12.2f} {r['client_cpu_ms_per_update']:13.2f}")
    print(f"one shard: {out['one_shard_fraction_of_raw']:.0%} of raw gRPC (median of {a.reps} alternating pairs: "
          f"{', '.join(f'{x:.0%}' for x in ratios)}); of raw unary: {out['one_shard_fraction_of_raw_unary']:.0%}; "
          f"burst of {a.burst}: {burst['errors']} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
