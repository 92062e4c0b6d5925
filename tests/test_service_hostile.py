"""Hostile clients that do not send malformed bytes but hold or flood the service: stalled and
half-sent streams, unread downloads, one token opening every slot, token-less floods. Each
against a real gRPC server on 127.0.0.1 (benchmarks/hostile.py runs the same at 2,000 streams)."""

from __future__ import annotations

import ctypes
import gc
import socket
import struct
import threading
import time

import grpc
import pytest
import torch

from fedray.compression import get_codec
from fedray.orchestrator.service import AggregationCore, ServiceLimits, create_server
from fedray.proto import serde
from fedray.proto.auth import client_token, verify_token
from fedray.workers.broadcast import make_broadcast

JOB, SECRET = "hostile-job", "hostile-secret"
SHAPES = {"w": (2048, 2048)}  # 16 MiB fp32: a download larger than HTTP/2 windows hold
UPLOAD = "/fedray.v1.Aggregation/Upload"


def _update(cid: int):
    x = torch.full(SHAPES["w"], 0.5)
    return serde.upload_messages(job_id=JOB, round=1, client_id=cid, weight=1.0,
                                 tensors=[("w", get_codec("identity").encode(x))])


@pytest.fixture
def live():
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES,
                           limits=ServiceLimits(max_inflight=4, idle_timeout_s=0.6))
    core.open_round(1, make_broadcast({"w": torch.zeros(SHAPES["w"])}, codec="identity", codec_params={}, round=1))
    server, port = create_server(core, "127.0.0.1:0")
    yield core, server, port
    server.stop(None)


def _channel(port: int) -> grpc.Channel:
    # its own connection (a shared subchannel would put every test stream on one connection);
    # no BDP probing, so that HTTP/2 flow-control windows stay small and an unread download
    # really stalls the server's sends rather than landing in the client's buffers
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS + (
        ("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)))


def _stalled_uploads(ch, n: int, first: bytes | None, cid: int | None, release: threading.Event):
    """n uploads that send `first` (or nothing), then stall; with client `cid`'s credentials, or none."""
    f = ch.stream_unary(UPLOAD, request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def gen():
        if first is not None:
            yield first
        release.wait(30)

    md = serde.credentials(JOB, cid, client_token(SECRET, JOB, cid)) if cid is not None else None
    return [f.future(gen(), metadata=md) for _ in range(n)]


def _code(fut, timeout: float = 10.0):
    try:
        fut.result(timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_stalled_streams_do_not_block_health_or_uploads_and_are_ended(live):
    core, server, port = live
    release = threading.Event()
    ch, good = _channel(port), _channel(port)
    try:
        # token-less: refused from the call's headers at once, whatever the body would be
        assert {_code(f, 5) for f in _stalled_uploads(ch, 8, None, None, release)} == {grpc.StatusCode.UNAUTHENTICATED}
        # more stalled streams than the old server had handler threads (max_inflight + 4 = 8),
        # with valid credentials and no first message
        stalled = _stalled_uploads(ch, 24, None, 9, release)
        time.sleep(0.2)
        t0 = time.perf_counter()
        # answered, not queued behind the stalled streams (which wait 30 s); the latency targets
        # (100 ms, 1 s) are benchmarks/hostile.py's, this bound only separates answered from stuck
        assert serde.call_health(good, timeout=5).status == "SERVING"
        assert time.perf_counter() - t0 < 5.0
        t0 = time.perf_counter()
        serde.call_upload(good, _update(1), token=client_token(SECRET, JOB, 1), timeout=10)
        assert time.perf_counter() - t0 < 10.0
        # ended by the server within the idle timeout (0.6 s) plus the watchdog's period
        t0 = time.perf_counter()
        assert {_code(f) for f in stalled} == {grpc.StatusCode.CANCELLED}
        assert time.perf_counter() - t0 < 8.0
        assert server.watchdog.cancelled >= 24
        # the cancelled handlers wake and let go of their streams (the client saw the end first)
        deadline = time.monotonic() + 5
        while (server.watchdog.open_streams() or core._per_client) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.watchdog.open_streams() == 0
    finally:
        release.set()
        ch.close()
        good.close()


def _h2_frame(typ: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([typ, flags]) + struct.pack(">I", sid) + payload


def _raw_call(port: int, method: str, body: bytes, *, cid: int | None = None, end_stream: bool = True,
              window: int = 65535) -> bool:
    """One call over raw HTTP/2 (a client that does exactly what it is told), with client `cid`'s
    credentials: HEADERS, a DATA frame with `body`, then nothing; the stream window is `window`
    bytes and never grows. Whether the server ended the stream (RST_STREAM or trailers) within 10 s."""
    md = list(serde.credentials(JOB, cid, client_token(SECRET, JOB, cid))) if cid is not None else []
    hdrs = [(":method", "POST"), (":scheme", "http"), (":path", method), (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"), ("te", "trailers")] + md
    block = b"".join(b"\x00" + bytes([len(k)]) + k.encode() + bytes([len(v)]) + v.encode() for k, v in hdrs)
    settings = struct.pack(">HI", 4, window)  # SETTINGS_INITIAL_WINDOW_SIZE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, settings) + _h2_frame(4, 1, 0, b"")
                  + _h2_frame(1, 4, 1, block) + _h2_frame(0, 1 if end_stream else 0, 1, body))
        t0, buf = time.monotonic(), b""
        while time.monotonic() - t0 < 10:
            try:
                got = s.recv(65536)
            except socket.timeout:
                continue
            if not got:
                return True  # connection closed: the stream is over
            buf += got
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                ln, typ, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                if sid == 1 and (typ == 3 or (typ == 1 and flags & 1)):
                    return True
                buf = buf[9 + ln:]
    return False


def test_half_sent_message_is_ended(live):
    """A gRPC message that declares 100 bytes and sends 10 (on a call with valid credentials, which
    the server reads): the server ends the stream."""
    core, server, port = live
    t0 = time.monotonic()
    assert _raw_call(port, UPLOAD, b"\x00" + struct.pack(">I", 100) + b"x" * 10, cid=6, end_stream=False)
    assert time.monotonic() - t0 < 8.0


def test_unread_download_is_ended_and_its_slot_freed(live):
    """A download whose client never opens its flow-control window: the server's send stalls, the
    stream is ended, and the client's download slot is free again."""
    core, server, port = live
    req = b"\x0a" + bytes([len(JOB)]) + JOB.encode() + b"\x10\x01\x18\x05"
    t0 = time.monotonic()
    assert _raw_call(port, "/fedray.v1.Aggregation/Download", b"\x00" + struct.pack(">I", len(req)) + req,
                     cid=5, window=0)
    assert time.monotonic() - t0 < 8.0
    deadline = time.monotonic() + 5  # the client may see the trailers before the watchdog counts them
    while (core._per_client or server.watchdog.cancelled != 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.watchdog.cancelled == 1 and core._per_client == {}
    ch = _channel(port)
    try:  # client 5 can download again
        assert len(serde.call_download(ch, job_id=JOB, round=1, client_id=5, token=client_token(SECRET, JOB, 5))) == 1
    finally:
        ch.close()


def test_one_token_cannot_hold_every_slot(live):
    core, server, port = live
    release = threading.Event()
    ch, good = _channel(port), _channel(port)
    try:
        head = _update(7)[0]
        head.ClearField("data")
        futs = _stalled_uploads(ch, 10, head.SerializeToString(), 7, release)
        time.sleep(0.3)
        # another client still gets a slot (max_inflight is 4)
        serde.call_upload(good, _update(8), token=client_token(SECRET, JOB, 8), timeout=5)
        codes = [_code(f) for f in futs]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 9
        assert codes.count(grpc.StatusCode.CANCELLED) == 1  # the admitted one, ended when idle
        # the slot is free again: client 7 uploads normally
        serde.call_upload(good, _update(7), token=client_token(SECRET, JOB, 7), timeout=5)
        assert core.committed(1) == 2
    finally:
        release.set()
        ch.close()
        good.close()


def _rss_mb() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_token_less_floods_allocate_and_cache_nothing(live):
    core, server, port = live
    ch = _channel(port)
    big = _update(3)[0]
    big.ClearField("data")
    big.header.tensors[0].name = "n" * (600 << 10)  # under gRPC's limit, over the header limit
    forged = _update(4)[0]
    forged.ClearField("data")
    forged.header.token = "9" * 12 + "." + "0" * 64
    odd = _update(4)[0]
    odd.ClearField("data")
    odd.header.token = "\u00e9" * 10  # non-ASCII: UNAUTHENTICATED, never INTERNAL
    up = ch.stream_unary(UPLOAD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    batch = ch.stream_unary("/fedray.v1.Aggregation/UploadBatch", request_serializer=lambda b: b,
                            response_deserializer=lambda b: b)
    # a batch call with one valid client's credentials, its update with a bad token of its own
    md = serde.credentials(JOB, 8, client_token(SECRET, JOB, 8))
    payloads = [(up, big.SerializeToString(), None), (batch, forged.SerializeToString(), md),
                (batch, odd.SerializeToString(), md), (batch, forged.SerializeToString(), None)]
    for f, p, m in payloads:  # warm: threads, arenas
        try:
            f(iter([p]), timeout=5, metadata=m)
        except grpc.RpcError:
            pass
    entries, rss0 = len(serde._ENTRY_CACHE), _rss_mb()
    codes = {}
    for i in range(300):
        for f, p, m in payloads:
            try:
                ack = f(iter([p]), timeout=5, metadata=m)
                key = ("result", serde.pb.UploadBatchAck.FromString(ack).results[0].code)
            except grpc.RpcError as e:
                key = e.code()
            codes[key] = codes.get(key, 0) + 1
    assert codes == {grpc.StatusCode.UNAUTHENTICATED: 600,
                     ("result", grpc.StatusCode.UNAUTHENTICATED.value[0]): 600}, codes
    assert len(serde._ENTRY_CACHE) == entries and core._codecs == {} and core._folders == {}
    assert _rss_mb() - rss0 < 50
    ch.close()


def test_token_less_bodies_are_never_received_or_parsed(live):
    """Credentials are checked from the call's headers: a token-less request is refused before
    gRPC receives its body, so a 7 MiB message (over the server's receive limit, which would be
    RESOURCE_EXHAUSTED once received) and bytes that are no protobuf (INVALID_ARGUMENT once
    parsed) both get UNAUTHENTICATED; bad credentials get the right status, with any client
    input in the message cut short."""
    core, server, port = live
    ch = _channel(port)
    raw = {m: (ch.stream_unary if m.startswith("Upload") else ch.unary_stream if m == "Download" else ch.unary_unary)(
        f"/fedray.v1.Aggregation/{m}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for m in ("Upload", "UploadBatch", "UploadPacked", "Download", "GetJob")}

    def code(method: str, body: bytes, md=None):
        try:
            if method.startswith("Upload"):
                raw[method](iter([body]), timeout=10, metadata=md)
            elif method == "Download":
                list(raw[method](body, timeout=10, metadata=md))
            else:
                raw[method](body, timeout=10, metadata=md)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""

    huge, junk = bytes(7 << 20), b"\xff" * 1000
    try:
        assert code("Upload", huge, serde.credentials(JOB, 3, client_token(SECRET, JOB, 3)))[0] == \
            grpc.StatusCode.RESOURCE_EXHAUSTED  # with credentials, gRPC reads the length prefix and refuses
        assert code("Upload", junk, serde.credentials(JOB, 3, client_token(SECRET, JOB, 3)))[0] == \
            grpc.StatusCode.INVALID_ARGUMENT
        forged = serde.credentials(JOB, 3, "9" * 12 + "." + "0" * 64)
        for method in raw:
            for body in (huge, junk):
                for md in (None, forged, (("x-fedray-token", client_token(SECRET, JOB, 3)),)):
                    assert code(method, body, md)[0] == grpc.StatusCode.UNAUTHENTICATED, (method, len(body), md)
        # malformed credentials: UNAUTHENTICATED; another job: PERMISSION_DENIED; messages short
        long_job = "j" * 6000  # under gRPC's metadata limit (8 KiB)
        cases = [(serde.credentials(JOB, 3, "7" * 5000), grpc.StatusCode.UNAUTHENTICATED),  # (gRPC's client
                 # library refuses non-ASCII header values itself)
                 ((("x-fedray-job-id", JOB), ("x-fedray-client-id", "3" * 3000), ("x-fedray-token", "1.ab")),
                  grpc.StatusCode.UNAUTHENTICATED),
                 ((("x-fedray-job-id", JOB), ("x-fedray-client-id", "-3"), ("x-fedray-token", "1.ab")),
                  grpc.StatusCode.UNAUTHENTICATED),
                 (serde.credentials(long_job, 3, client_token(SECRET, long_job, 3)), grpc.StatusCode.PERMISSION_DENIED)]
        for md, want in cases:
            got, details = code("Upload", huge, md)
            assert got == want and len(details) <= 1024, (md[1], got, details[:200])
        # the body must name the metadata's client and job (the token is checked against them)
        other = _update(4)[0]
        other.ClearField("data")
        got = code("Upload", other.SerializeToString(), serde.credentials(JOB, 3, client_token(SECRET, JOB, 3)))
        assert got[0] == grpc.StatusCode.UNAUTHENTICATED
        # nothing was converted or cached, no upload slot taken; Health needs no credentials
        assert core._codecs == {} and core._folders == {} and core._per_client == {}
        assert serde.call_health(ch).status == "SERVING"
    finally:
        ch.close()


def test_tokens_are_scoped_expire_and_never_raise():
    now = time.time()
    t = client_token(SECRET, JOB, 3, expires=int(now) + 60)
    assert verify_token(SECRET, JOB, 3, t)
    assert not verify_token(SECRET, JOB, 4, t) and not verify_token(SECRET, "other", 3, t)
    assert not verify_token(SECRET, JOB, 3, t, now=now + 61)  # expired
    assert not verify_token(SECRET, JOB, 3, t.split(".")[1])  # no expiry
    exp, mac = t.split(".")
    assert not verify_token(SECRET, JOB, 3, f"{int(exp) + 10**6}.{mac}")  # a later expiry is not signed
    for bad in ("", "\u00e9" * 70, "x" * 10_000, "1.\u00e9", ".", "1e9." + mac, None):
        assert not verify_token(SECRET, JOB, 3, bad)
    # any job name travels as a valid header value (percent-encoded) and comes back as it was
    md = serde.credentials("j\u00f6b: 1/2%", 3, t)
    assert all(v.isascii() for _, v in md) and serde._metadata_credentials(md) == ("j\u00f6b: 1/2%", 3, t)


def test_a_token_verified_once_is_still_scoped_and_expires():
    """The core remembers tokens it verified (so an upload's three checks cost one HMAC): a
    remembered token still opens nothing for another client or job, and not after its expiry."""
    from fedray.orchestrator.service import AuthError, WrongJobError

    core = AggregationCore(job_id=JOB, secret=SECRET, shapes={"w": (4,)})
    t = client_token(SECRET, JOB, 3, expires=int(time.time()) + 2)
    core.authenticate(JOB, 3, t)
    core.authenticate(JOB, 3, t)  # remembered
    with pytest.raises(AuthError):
        core.authenticate(JOB, 4, t)
    with pytest.raises(WrongJobError):
        core.authenticate("other", 3, t)
    forged = f"{t.split('.')[0]}.{'0' * 64}"
    with pytest.raises(AuthError):
        core.authenticate(JOB, 3, forged)
    time.sleep(max(0.0, int(t.split(".")[0]) + 1.05 - time.time()))
    with pytest.raises(AuthError):
        core.authenticate(JOB, 3, t)


def test_declared_weight_is_capped():
    """A client that declares 1e11 examples counts as max_weight (StrategySpec.max_weight_share)."""
    from fedray.orchestrator.strategy import StrategySpec

    cap = StrategySpec(max_weight_share=0.25).weight_cap(clients_per_round=4, mean_examples=2.0)
    assert cap == 2.0 and StrategySpec().weight_cap(clients_per_round=4, mean_examples=2.0) is None
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes={"w": (4,)}, max_weight=cap)
    server, port = create_server(core, "127.0.0.1:0")
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
    try:
        core.open_round(1)
        c = get_codec("identity")
        for cid, x, w in ((1, 1.0, 1e11), (2, 4.0, 1.0)):
            msgs = serde.upload_messages(job_id=JOB, round=1, client_id=cid, weight=w,
                                         tensors=[("w", c.encode(torch.full((4,), x)))])
            serde.call_upload(ch, msgs, token=client_token(SECRET, JOB, cid))
        part = core.close_round(1)
        assert part["total_weight"] == 3.0
        assert torch.equal(part["sums"]["w"], torch.full((4,), 2.0 * 1.0 + 1.0 * 4.0, dtype=part["sums"]["w"].dtype))
    finally:
        ch.close()
        server.stop(None)
