"""Hostile clients against a live aggregation service (127.0.0.1 only, bounded counts and times).

    python benchmarks/hostile.py --json benchmarks/results/hostile.json [--streams 2000] [--flood 10000]
        [--flood-big 10000] [--only NAME,...] [--server-option grpc.KEY=VALUE ...]

The service (`AggregationCore` behind `create_server`, default `ServiceLimits` except
--idle-timeout) runs in its own process with round 1 open on a 16 MiB model. Each attack runs
on an asyncio gRPC client (or raw HTTP/2 frames for half-sent messages); meanwhile this process
measures Health latency (one call every 10 ms) and a well-behaved client's upload commit latency
(a 16 MiB identity update, fresh client id each time), and reads the server's RSS and CPU from
/proc (RSS after the server collected garbage and handed freed heap back with malloc_trim, so
that it shows what the server holds rather than what glibc keeps; the untrimmed value is
recorded too for floods). Stall attacks record how long after the last stream opened the server had ended them all;
flood attacks record the server CPU per refused request and RSS growth (and the highest untrimmed
RSS sampled every 50 ms while they ran). Every attack records the status codes its requests got;
`aio_write_after_end` counts calls whose status the asyncio client lost because its own write of
the request failed after the server had already ended the call (grpc.aio reports INTERNAL then).
"With a token" means a valid client's credentials in the call metadata (`serde.credentials`);
"no token" means none, and "forged" a token that does not verify. --flood-big sets the count
of the multi-MiB kinds; --only runs the attacks whose names contain one of the given parts;
--server-option adds gRPC server options, which take precedence over the service's own (to
measure a setting: grpc.http2.bdp_probe=1 turns BDP probing back on; recorded in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

JOB, SECRET = "hostile", "hostile-secret"
SHAPES = {"w": (4096, 1024)}  # 16 MiB fp32: more than HTTP/2 windows hold, so unread downloads block
M_UPLOAD, M_BATCH, M_DOWNLOAD = ("/fedray.v1.Aggregation/" + m for m in ("Upload", "UploadBatch", "Download"))


# -- the server process -----------------------------------------------------------------------------

def _serve(idle_s: float, server_options: list[str]) -> None:
    import torch

    from fedray.orchestrator.service import AggregationCore, ServiceLimits, create_server
    from fedray.proto import serde
    from fedray.workers.broadcast import make_broadcast

    for o in server_options:  # --server-option: gRPC channel arguments on top of the service's own
        k, _, v = o.partition("=")
        serde.GRPC_OPTIONS += ((k, int(v) if v.lstrip("-").isdigit() else v),)

    torch.set_num_threads(1)
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, limits=ServiceLimits(idle_timeout_s=idle_s))
    g = {k: torch.zeros(s) for k, s in SHAPES.items()}
    core.open_round(1, make_broadcast(g, codec="identity", codec_params={}, round=1))
    server, port = create_server(core, "127.0.0.1:0")
    libc = ctypes.CDLL("libc.so.6")
    # SIGUSR1: hand freed heap back to the OS, so that RSS shows what is held, not what glibc keeps
    signal.signal(signal.SIGUSR1, lambda *_: (gc.collect(), libc.malloc_trim(0)))
    print(port, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    os._exit(0)  # no interpreter teardown (grpcio's abort at exit)


def _proc(pid: int, trim: bool = False) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process; with `trim`, RSS after it collected garbage and
    returned freed heap to the OS (SIGUSR1 to the server)."""
    if trim:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


# -- messages ---------------------------------------------------------------------------------------

def _token(cid: int) -> str:
    from fedray.proto.auth import client_token

    return client_token(SECRET, JOB, cid)


def _creds(cid: int, token: str | None = None) -> tuple:
    """Client `cid`'s call metadata (job, client, token; its valid token unless `token`)."""
    from fedray.proto.serde import credentials

    return credentials(JOB, cid, _token(cid) if token is None else token)


def _update(cid: int, *, tensors=None):
    import torch

    from fedray.compression import get_codec
    from fedray.proto import serde

    c = get_codec("identity")
    tensors = tensors or [(k, c.encode(torch.full(s, 0.001))) for k, s in SHAPES.items()]
    return serde.upload_messages(job_id=JOB, round=1, client_id=cid, weight=1.0, tensors=tensors)


def _header_only(cid: int) -> bytes:
    m = _update(cid)[0]
    m.ClearField("data")
    return m.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _download_request(cid: int, job: str = JOB) -> bytes:
    j = job.encode()
    return b"\x0a" + _varint(len(j)) + j + b"\x10\x01\x18" + _varint(cid)


# -- attacks (asyncio gRPC clients) -------------------------------------------------------------------

def _channels(addr: str, n: int):
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0),  # small windows: unread stalls
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]
    return [grpc.aio.insecure_channel(addr, options=opts) for _ in range(n)]


async def _stall(addr: str, n: int, kind: str, hold_s: float, opened: threading.Event,
                 idle_s: float = 0.0) -> collections.Counter:
    """n streams that stall: 'upload' (nothing sent), 'upload_token' (a header with a valid token,
    then nothing), 'download_token' (one client's token, never read). 200 streams a connection."""
    chans = _channels(addr, max(1, -(-n // 200)))
    stop = asyncio.Event()

    async def gen(first: bytes | None):
        if first is not None:
            yield first
        await stop.wait()

    calls = []
    head = _header_only(424242) if kind == "upload_token" else None
    md = _creds(424242)
    for i in range(n):
        ch = chans[i // 200]
        if kind.startswith("upload"):
            f = ch.stream_unary(M_UPLOAD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            calls.append(f(gen(head), metadata=md if kind == "upload_token" else None))
        else:
            f = ch.unary_stream(M_DOWNLOAD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            calls.append(f(_download_request(424242), metadata=md))
    await asyncio.sleep(0.5)
    opened.set()

    async def code(c):
        try:
            if kind == "download_token":
                # an unread download learns its end only by reading: wait past the idle timeout,
                # then drain; CANCELLED means the server had ended it, OK that it was still sending
                await asyncio.sleep(idle_s + 3)
                async for _ in c:
                    pass
            got = await asyncio.wait_for(c.code(), hold_s)
            if got == grpc.StatusCode.INTERNAL and "execute_batch" in (await c.debug_error_string() or ""):
                return "aio_write_after_end"  # as in _aio_code
            return got.name
        except grpc.aio.AioRpcError as e:
            return _aio_code(e)
        except asyncio.TimeoutError:
            return "STILL_OPEN"

    codes = collections.Counter(await asyncio.gather(*(code(c) for c in calls)))
    stop.set()
    for c in calls:
        c.cancel()
    for ch in chans:
        await ch.close()
    return codes


async def _half_sent(port: int, n: int, hold_s: float, opened: threading.Event) -> collections.Counter:
    """n Upload streams over raw HTTP/2 (250 a connection), each with a valid client's credentials
    (so that the server reads the body) and a gRPC message that declares 100 bytes and sends 10.
    Counts the streams the server ended (RST_STREAM or trailers)."""
    def hpack(headers):
        out = bytearray()
        for k, v in headers:
            out += b"\x00" + bytes([len(k)]) + k.encode() + bytes([len(v)]) + v.encode()
        return bytes(out)

    def frame(typ: int, flags: int, sid: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([typ, flags]) + struct.pack(">I", sid) + payload

    hdr = hpack([(":method", "POST"), (":scheme", "http"), (":path", M_UPLOAD), (":authority", f"127.0.0.1:{port}"),
                 ("content-type", "application/grpc"), ("te", "trailers"), *_creds(424243)])
    ended = collections.Counter()

    async def conn(k: int):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
        sids = [1 + 2 * i for i in range(k)]
        for sid in sids:
            w.write(frame(1, 4, sid, hdr) + frame(0, 0, sid, b"\x00" + struct.pack(">I", 100) + b"x" * 10))
        await w.drain()
        done: set[int] = set()
        deadline = time.monotonic() + hold_s
        try:
            while len(done) < k and time.monotonic() < deadline:
                head = await asyncio.wait_for(r.readexactly(9), deadline - time.monotonic())
                ln, typ, flags, sid = int.from_bytes(head[:3], "big"), head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF
                body = await r.readexactly(ln)
                if typ == 4 and not flags & 1:
                    w.write(frame(4, 1, 0, b""))  # SETTINGS ack
                elif typ == 6 and not flags & 1:
                    w.write(frame(6, 1, 0, body))  # PING ack
                elif typ == 3 or (typ == 1 and flags & 1):  # RST_STREAM, or trailers ending the stream
                    if sid not in done:
                        done.add(sid)
                        ended["RST_STREAM" if typ == 3 else "TRAILERS"] += 1
                elif typ == 7:  # GOAWAY: every stream of the connection is over
                    ended["GOAWAY"] += k - len(done)
                    done.update(sids)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        ended["STILL_OPEN"] += k - len(done)
        w.close()

    per = 250
    tasks = [asyncio.ensure_future(conn(min(per, n - i))) for i in range(0, n, per)]
    await asyncio.sleep(0.5)
    opened.set()
    await asyncio.gather(*tasks)
    return ended


def _aio_code(e: grpc.aio.AioRpcError) -> str:
    """The status name, or `aio_write_after_end` for grpc.aio's own INTERNAL: its write of the
    request failed because the server had already ended the call (refused it from its headers, or
    after the first message), and the server's status is lost on the client."""
    if e.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (e.debug_error_string() or ""):
        return "aio_write_after_end"
    return e.code().name


async def _flood(addr: str, kind: str, n: int, payload: bytes | None) -> collections.Counter:
    """n refused requests of `kind`, 16 at a time."""
    ch = _channels(addr, 1)[0]
    up = ch.stream_unary(M_UPLOAD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    batch = ch.stream_unary(M_BATCH, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    down = ch.unary_stream(M_DOWNLOAD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    codes: collections.Counter = collections.Counter()
    sem = asyncio.Semaphore(16)

    async def one(i: int):
        async with sem:
            try:
                if kind == "batch":
                    ack = await batch(iter([payload]), timeout=30)
                    codes[f"result:{_first_result_code(ack)}"] += 1
                    return
                if kind.startswith("download"):
                    # download_forged: client 3's valid credentials, another (1 MiB) job in the body
                    md = _creds(3) if kind == "download_forged" else None
                    async for _ in down(payload, timeout=30, metadata=md):
                        pass
                else:
                    md = _creds(7, "forged." + "0" * 64) if kind == "forged" else None
                    await up(iter([payload]), timeout=30, metadata=md)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[_aio_code(e)] += 1
                if len(e.details() or "") > 2048:
                    codes["message_over_2KiB"] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    await ch.close()
    return codes


def _first_result_code(ack: bytes) -> int:
    from fedray.proto._generated import aggregation_pb2 as pb  # a hostile client has the .proto too

    r = pb.UploadBatchAck.FromString(ack).results
    return r[0].code if r else -1


# -- measuring ----------------------------------------------------------------------------------------

class Bench:
    def __init__(self, a) -> None:
        self.a = a
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--idle-timeout", str(a.idle_timeout),
                                      *(f"--server-option={o}" for o in getattr(a, "server_option", []))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.addr = f"127.0.0.1:{self.port}"
        from fedray.proto import serde

        self.serde = serde
        self.ch = grpc.insecure_channel(self.addr, options=serde.GRPC_OPTIONS)
        self.next_cid = 1
        self.wire = serde.encode_upload(job_id=JOB, round=1, client_id=0, weight=1.0,
                                        tensors=[(n, m) for n, m in _tensors()])
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def commit_ms(self) -> float:
        cid = self.next_cid
        self.next_cid += 1
        h = type(self.wire.header)()
        h.CopyFrom(self.wire.header)
        h.client_id = cid
        t0 = time.perf_counter()
        self.serde.call_upload(self.ch, self.wire.with_header(h), token=_token(cid), timeout=30)
        return 1e3 * (time.perf_counter() - t0)

    def health_ms(self, seconds: float) -> list[float]:
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                self.serde.call_health(self.ch, timeout=5)
                out.append(1e3 * (time.perf_counter() - t0))
            except grpc.RpcError:
                out.append(float("inf"))
            time.sleep(0.01)
        return out

    def stall(self, name: str, coro_fn) -> dict:
        rss0, cpu0 = _proc(self.proc.pid, trim=True)
        opened = threading.Event()
        fut = asyncio.run_coroutine_threadsafe(coro_fn(opened), self.loop)
        opened.wait(120)
        t_open = time.monotonic()
        time.sleep(min(1.5, self.a.idle_timeout / 3))  # the streams are open on the server
        rss_open, _ = _proc(self.proc.pid)
        health = self.health_ms(2.0)
        commits = [self.commit_ms() for _ in range(10)]
        codes = fut.result(timeout=self.a.idle_timeout + 60)
        ended_s = time.monotonic() - t_open
        rss1, cpu1 = _proc(self.proc.pid, trim=True)
        return self._row(name, codes, health, commits, rss0, rss1, cpu1 - cpu0, extra={
            "rss_with_streams_open_mb": round(rss_open / 2**20, 1), "all_ended_after_s": round(ended_s, 2)})

    def flood(self, name: str, kind: str, n: int, payload) -> dict:
        rss0, cpu0 = _proc(self.proc.pid, trim=True)
        peak, done = [rss0], threading.Event()

        def sample():  # the untrimmed RSS while the flood runs, every 50 ms
            while not done.wait(0.05):
                peak.append(_proc(self.proc.pid)[0])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        codes = asyncio.run_coroutine_threadsafe(_flood(self.addr, kind, n, payload), self.loop).result(timeout=1800)
        wall = time.monotonic() - t0
        done.set()
        sampler.join()
        rss_raw, cpu1 = _proc(self.proc.pid)
        rss1, _ = _proc(self.proc.pid, trim=True)
        health = self.health_ms(0.5)
        return self._row(name, codes, health, [self.commit_ms()], rss0, rss1, cpu1 - cpu0, extra=dict(
            requests=n, server_cpu_ms_per_request=round(1e3 * (cpu1 - cpu0) / n, 3),
            server_rss_end_untrimmed_mb=round(rss_raw / 2**20, 1),
            server_rss_max_during_mb=round(max(peak) / 2**20, 1), wall_s=round(wall, 2)))

    def _row(self, name, codes, health, commits, rss0, rss1, cpu, extra=None) -> dict:
        h = np.array(health)
        row = {
            "attack": name, "statuses": dict(codes),
            "health_ms": {"p50": round(float(np.percentile(h, 50)), 2), "p99": round(float(np.percentile(h, 99)), 2),
                          "max": round(float(h.max()), 2), "n": len(h)},
            "commit_ms": {"median": round(statistics.median(commits), 1), "max": round(max(commits), 1), "n": len(commits)},
            "server_rss_start_mb": round(rss0 / 2**20, 1), "server_rss_end_mb": round(rss1 / 2**20, 1),
            "server_cpu_s": round(cpu, 3), **(extra or {}),
        }
        print(json.dumps(row), flush=True)
        return row

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _tensors():
    import torch

    from fedray.compression import get_codec

    c = get_codec("identity")
    return [(k, c.encode(torch.full(s, 0.001))) for k, s in SHAPES.items()]


def _hostile_headers() -> dict[str, bytes]:
    """Token-less upload first messages of the shapes seen in the review (finding 2, 3, 8)."""
    big_name = _update(7)[0]
    big_name.ClearField("data")
    big_name.header.tensors[0].name = "n" * (7 << 20)
    entries = _update(7)[0]
    entries.ClearField("data")
    for _ in range(920_000):
        entries.header.tensors.add(name="")
    metrics = _update(7)[0]
    metrics.ClearField("data")
    for i in range(350_000):  # 6.6 MB: under gRPC's 8 MiB message limit, so the service sees it
        metrics.header.metrics[str(i)] = 1.0
    job = _update(7)[0]
    job.ClearField("data")
    job.header.job_id = "j" * (1 << 20)
    small = _header_only(7)
    return {"big_name_7MiB": big_name.SerializeToString(), "tensor_entries_920k": entries.SerializeToString(),
            "metrics_350k": metrics.SerializeToString(), "job_id_1MiB_forged_token": job.SerializeToString(),
            "small_no_token": small}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=False)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--flood", type=int, default=10_000, help="refused requests per small kind")
    p.add_argument("--flood-big", type=int, default=10_000, help="refused requests per multi-MiB kind")
    p.add_argument("--idle-timeout", type=float, default=5.0)
    p.add_argument("--only", default="", help="comma-separated parts of attack names: run only those")
    p.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a gRPC server option on top of the service's own (e.g. grpc.http2.bdp_probe=0)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        return _serve(a.idle_timeout, a.server_option)
    if not a.json:
        p.error("--json PATH is required")
    b = Bench(a)
    rows = []
    try:
        b.commit_ms()  # warm
        for name, run in _attacks(b, a):
            if not a.only or any(k in name for k in a.only.split(",")):
                rows.append(run())
    finally:
        b.close()
    out = {"command": "python benchmarks/hostile.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "idle_timeout_s": a.idle_timeout, "streams": a.streams, "server_options": a.server_option,
           "load_average": list(os.getloadavg()), "attacks": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    os._exit(0)


def _attacks(b: "Bench", a) -> list:
    """(name, thunk) of every attack, in the order they run."""
    hold = a.idle_timeout + 30
    out = [
        ("baseline_no_attack", lambda: b.stall("baseline_no_attack", lambda ev: _stall(b.addr, 0, "upload", 1, ev))),
        ("stalled_uploads_no_token", lambda: b.stall(
            "stalled_uploads_no_token", lambda ev: _stall(b.addr, a.streams, "upload", hold, ev))),
        ("stalled_uploads_valid_token", lambda: b.stall(
            "stalled_uploads_valid_token", lambda ev: _stall(b.addr, a.streams, "upload_token", hold, ev))),
        ("unread_downloads_valid_token", lambda: b.stall(
            "unread_downloads_valid_token",
            lambda ev: _stall(b.addr, a.streams, "download_token", hold, ev, a.idle_timeout))),
        ("half_sent_messages", lambda: b.stall("half_sent_messages", lambda ev: _half_sent(b.port, a.streams, hold, ev))),
        ("one_token_64_stalled_uploads", lambda: b.stall(
            "one_token_64_stalled_uploads", lambda ev: _stall(b.addr, 64, "upload_token", hold, ev))),
    ]
    # post-auth, one valid client: empty chunks, an oversize declaration, codec versions
    m = _update(900_001)
    empty = [m[0].SerializeToString()] + [b""] * 50
    out.append(("empty_chunks_valid_token", lambda: _one(b, "empty_chunks_valid_token", empty, 900_001)))
    over = _update(900_002)
    over[0].header.tensors[0].nbytes = 4 << 30
    out.append(("declared_4GiB_identity_valid_token", lambda: _one(
        b, "declared_4GiB_identity_valid_token", [over[0].SerializeToString()] + [bytes(1 << 20)] * 8, 900_002)))
    for name, payload in _hostile_headers().items():
        n = a.flood_big if len(payload) > (1 << 20) - 1 else a.flood
        out.append((name, lambda name=name, payload=payload, n=n: b.flood(
            name, "forged" if "forged" in name else "upload", n, payload)))
    forged = _update(9)[0]
    forged.header.token = "1" * 10 + "." + "0" * 64
    out.append(("batch_forged_token", lambda: b.flood("batch_forged_token", "batch", a.flood, forged.SerializeToString())))
    non_ascii = _update(9)[0]
    non_ascii.header.token = "\u00e9" * 40
    out.append(("batch_non_ascii_token", lambda: b.flood(
        "batch_non_ascii_token", "batch", a.flood, non_ascii.SerializeToString())))
    out.append(("download_no_token", lambda: b.flood("download_no_token", "download", a.flood, _download_request(3))))
    out.append(("download_job_id_1MiB_forged_token", lambda: b.flood(
        "download_job_id_1MiB_forged_token", "download_forged", a.flood_big, _download_request(3, "j" * (1 << 20)))))
    out.append(("codec_versions_valid_token", lambda: _versions(b, a.flood)))
    return out


def _one(b: Bench, name: str, msgs: list[bytes], cid: int) -> dict:
    """One upload of raw messages with client `cid`'s token; its status."""
    rss0, cpu0 = _proc(b.proc.pid)
    f = b.ch.stream_unary(M_UPLOAD, request_serializer=lambda x: x, response_deserializer=lambda x: x)
    try:
        f(iter(msgs), timeout=30, metadata=_creds(cid))
        codes = {"OK": 1}
    except grpc.RpcError as e:
        codes = {e.code().name: 1}
    rss1, cpu1 = _proc(b.proc.pid)
    return b._row(name, codes, b.health_ms(0.3), [b.commit_ms()], rss0, rss1, cpu1 - cpu0)


def _versions(b: Bench, n: int) -> dict:
    """n uploads of one valid client, each with another codec_version (refused, never cached)."""
    head = _update(77)[0]
    head.ClearField("data")

    def msgs():
        for v in range(n):
            head.header.tensors[0].codec_version = 1000 + v
            yield head.SerializeToString()

    rss0, cpu0 = _proc(b.proc.pid)
    codes: collections.Counter = collections.Counter()
    f = b.ch.stream_unary(M_UPLOAD, request_serializer=lambda x: x, response_deserializer=lambda x: x)
    md = _creds(77)
    for m in msgs():
        try:
            f(iter([m]), timeout=30, metadata=md)
            codes["OK"] += 1
        except grpc.RpcError as e:
            codes[e.code().name] += 1
    rss1, cpu1 = _proc(b.proc.pid)
    return b._row("codec_versions_valid_token", codes, b.health_ms(0.3), [b.commit_ms()], rss0, rss1, cpu1 - cpu0,
                  extra=dict(requests=n, server_cpu_ms_per_request=round(1e3 * (cpu1 - cpu0) / n, 3)))


if __name__ == "__main__":
    main()
