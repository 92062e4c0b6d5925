"""The aggregation service over real gRPC on 127.0.0.1, port 0."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch

from fedray.compression import get_codec
from fedray.orchestrator.service import (AggregationCore, RoundClosedError, RoundNotOpenYetError, ServiceLimits,
                                         create_server, status_of)
from fedray.proto import serde
from fedray.proto.auth import client_token

SHAPES = {"w": (64, 300), "b": (64,)}
JOB, SECRET = "job-a", "s3cret"


@pytest.fixture()
def service():
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, limits=ServiceLimits(max_update_bytes=1 << 22))
    server, port = create_server(core, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
    core.open_round(1)
    yield core, channel
    channel.close()
    server.stop(None)


def _update(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}


def _msgs(update, client_id=1, round=1, codec="int8", job=JOB, weight=10.0, chunk_bytes=4096):
    c = get_codec(codec)
    return serde.upload_messages(job_id=job, round=round, client_id=client_id, weight=weight,
                                 tensors=[(k, c.encode(v)) for k, v in update.items()], chunk_bytes=chunk_bytes)


def _send(channel, msgs, client_id=1, token=None):
    # the call's credentials are client_id's, whatever the messages say (or lack: _no_header)
    return serde.call_upload(channel, msgs, token=client_token(SECRET, JOB, client_id) if token is None else token,
                             job_id=JOB, client_id=client_id)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_upload_is_decoded_and_aggregated(service):
    core, ch = service
    ups = {cid: _update(cid) for cid in (1, 2, 3)}
    for cid, u in ups.items():
        ack = _send(ch, _msgs(u, client_id=cid, weight=float(cid)), client_id=cid)
        assert ack["accepted"] and ack["round"] == 1
    part = core.close_round(1)
    assert part["count"] == 3 and part["total_weight"] == 6.0
    for k in SHAPES:
        oracle = sum(cid * ups[cid][k].double() for cid in ups)
        # int8 error per value is at most scale/2 = absmax/254
        tol = sum(cid * ups[cid][k].abs().max().item() / 254 for cid in ups)
        assert (part["sums"][k] - oracle).abs().max().item() <= tol + 1e-6


def test_identity_codec_is_exact_over_the_wire(service):
    core, ch = service
    u = _update(9)
    _send(ch, _msgs(u, codec="identity", weight=2.0))
    part = core.close_round(1)
    for k in SHAPES:
        assert torch.equal(part["sums"][k], 2.0 * u[k].double())


def _redigest(msgs):
    """Recompute the digest after tampering, so that the decoder (not the checksum) must refuse."""
    h = serde.new_digest()
    for m in msgs:
        h.update(m.data)
    msgs[0].header.digest = h.digest()
    return msgs


def _bit_flip(msgs):
    data = bytearray(msgs[0].data)
    data[7] ^= 0x10
    msgs[0].data = bytes(data)
    return msgs


def _tamper_bytes(msgs):
    msgs[-1].data = msgs[-1].data[:-1]
    return msgs


def _bad_shape(msgs):
    msgs[0].header.tensors[0].shape[:] = [64, 301]
    return msgs


def _bad_codec(msgs):
    msgs[0].header.tensors[0].codec = "zip9"
    return msgs


def _nan_scale(msgs):
    # int8 layout: float32 scales first; the "b" tensor (64,) with rows=1 has one scale.
    meta = msgs[0].header.tensors
    start = sum(m.nbytes for m in meta[:1])
    chunk, off = divmod(start, 4096)
    data = bytearray(msgs[chunk].data)
    data[off : off + 4] = np.array([np.nan], np.float32).tobytes()
    msgs[chunk].data = bytes(data)
    return _redigest(msgs)


def _no_header(msgs):
    msgs[0].ClearField("header")
    return msgs


def _huge_declared(msgs):
    msgs[0].header.tensors[0].nbytes = 1 << 40
    return msgs


@pytest.mark.parametrize("tamper", [_tamper_bytes, _bad_shape, _bad_codec, _nan_scale, _no_header, _huge_declared, _bit_flip])
def test_malformed_upload_is_invalid_argument_and_leaves_the_sum_untouched(service, tamper):
    core, ch = service
    good = _update(1)
    _send(ch, _msgs(good, client_id=1), client_id=1)
    bad = tamper(_msgs(_update(2), client_id=2))
    assert _code(lambda: _send(ch, bad, client_id=2)) == grpc.StatusCode.INVALID_ARGUMENT
    part = core.close_round(1)
    assert part["count"] == 1 and part["total_weight"] == 10.0
    # Bit-identical to a service that only ever saw the good update...
    ref = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    ref.open_round(1)
    msgs = _msgs(good, client_id=1)
    ref.upload(serde._header(msgs[0].header), ((m.offset, m.data) for m in msgs), client_token(SECRET, JOB, 1))
    want = ref.close_round(1)["sums"]
    c = get_codec("int8")
    for k in SHAPES:
        assert torch.equal(part["sums"][k], want[k])
        # ...which holds weight x the decoded good update (float64 rounding apart).
        assert torch.allclose(part["sums"][k], 10.0 * c.decode(c.encode(good[k])).double(), rtol=1e-6, atol=0)


def test_auth_job_round_and_duplicates(service):
    core, ch = service
    u = _update(3)
    assert _code(lambda: _send(ch, _msgs(u), token="")) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: _send(ch, _msgs(u), token="0" * 64)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: _send(ch, _msgs(u, client_id=1), client_id=2)) == grpc.StatusCode.UNAUTHENTICATED
    other_job = _msgs(u, job="job-b")
    assert _code(lambda: serde.call_upload(ch, other_job, token=client_token(SECRET, "job-b", 1))) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _send(ch, _msgs(u, round=0))) == grpc.StatusCode.FAILED_PRECONDITION
    _send(ch, _msgs(u))
    assert _code(lambda: _send(ch, _msgs(u))) == grpc.StatusCode.ALREADY_EXISTS
    assert core.close_round(1)["count"] == 1
    assert _code(lambda: _send(ch, _msgs(u, client_id=5), client_id=5)) == grpc.StatusCode.FAILED_PRECONDITION


def test_download_streams_the_round_model(service):
    core, ch = service
    g = _update(4)
    c = get_codec("identity")
    from fedray.workers.broadcast import make_broadcast

    core.open_round(2, make_broadcast(g, codec="identity", codec_params={}, round=2))
    stages = serde.call_download(ch, job_id=JOB, round=2, client_id=7, token=client_token(SECRET, JOB, 7))
    assert len(stages) == 1 and stages[0].round == 2
    got = {k: c.decode(p) for k, p in stages[0].tensors}
    for k in SHAPES:
        assert torch.equal(got[k], g[k])
    assert _code(lambda: serde.call_download(ch, job_id=JOB, round=3, client_id=7,
                                             token=client_token(SECRET, JOB, 7))) == grpc.StatusCode.FAILED_PRECONDITION
    h = serde.call_health(ch)
    # without credentials Health says only SERVING; the counters are for the shard's owner
    assert h.status == "SERVING" and (h.job_id, h.round, h.updates_committed) == ("", 0, 0)
    assert core.health().round == 2


def test_large_update_spans_many_chunks():
    shapes = {"big": (1500, 1000)}  # 6 MB fp32: over gRPC's default 4 MiB message size
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=shapes)
    server, port = create_server(core, "127.0.0.1:0")
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
        core.open_round(1)
        x = torch.randn(1500, 1000)
        msgs = serde.upload_messages(job_id=JOB, round=1, client_id=1, weight=1.0,
                                     tensors=[("big", get_codec("identity").encode(x))])
        assert len(msgs) == 6
        _send(ch, msgs)
        assert torch.equal(core.close_round(1)["sums"]["big"], x.double())
    finally:
        server.stop(None)


def test_a_client_is_accepted_only_by_its_own_shard():
    from fedray.proto.serde import shard_index

    cid = next(c for c in range(100) if shard_index(c, 2) == 0)
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, shard=(1, 2))
    core.set_addresses(("127.0.0.1:1", "127.0.0.1:2"))
    server, port = create_server(core, "127.0.0.1:0")
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
        core.open_round(1)
        with pytest.raises(grpc.RpcError) as e:
            _send(ch, _msgs(_update(1), client_id=cid), client_id=cid)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "127.0.0.1:1" in e.value.details()
        assert core.close_round(1)["count"] == 0
    finally:
        server.stop(None)


def _upload_in_process(core, update, client_id, codec="int8", chunk_bytes=4096):
    msgs = _msgs(update, client_id=client_id, codec=codec, chunk_bytes=chunk_bytes)
    return core.upload(serde._header(msgs[0].header), ((m.offset, m.data) for m in msgs),
                       client_token(SECRET, JOB, client_id))


def test_staging_buffers_are_reused_without_aliasing():
    """A buffered strategy (median) keeps every update: the reused decode buffers must not leak
    one upload's values into another's."""
    from fedray.orchestrator.strategy import StrategySpec

    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, strategy=StrategySpec(name="median"))
    assert not core._folds  # the decode-into-staging path
    core.open_round(1)
    ups = {cid: _update(100 + cid) for cid in (1, 2, 3)}
    for cid, u in ups.items():
        _upload_in_process(core, u, cid)
    buf = core.close_round(1)["agg"]
    c = get_codec("int8")
    for got, cid in zip(buf.updates, ups):
        for k in SHAPES:
            assert torch.equal(got[k], c.decode(c.encode(ups[cid][k])))
    assert len(core._scratch._free[64 * 300]) == 1  # one upload at a time: one buffer, reused


def test_fold_path_equals_decode_path():
    """The fold path (int8 and identity straight into the float64 sum) and the staging path
    (decode to float32, then add) give the same sums up to float32 rounding of the decoded values."""
    from fedray.orchestrator.strategy import StrategySpec

    sums = []
    for spec in (StrategySpec(), StrategySpec(clip_norm=1e9)):  # clip_norm (never reached) forces decoding
        core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, strategy=spec)
        core.open_round(1)
        for cid in (1, 2):
            _upload_in_process(core, _update(cid), cid, codec="int8")
        _upload_in_process(core, _update(3), 3, codec="identity", chunk_bytes=1 << 20)
        sums.append((core._folds, core.close_round(1)["sums"]))
    assert sums[0][0] and not sums[1][0]
    for k in SHAPES:
        assert torch.allclose(sums[0][1][k], sums[1][1][k], rtol=0, atol=1e-5)  # |values| <= ~40: float32 ulp ~4e-6


def test_wire_uploads_and_garbage_chunks(service):
    """Pre-framed uploads (`encode_upload`, the workers' path) are accepted by Upload and
    UploadBatch; bytes that are not an UploadChunk are INVALID_ARGUMENT and change nothing."""
    core, ch = service
    c = get_codec("int8")

    def wire(cid):
        return serde.encode_upload(job_id=JOB, round=1, client_id=cid, weight=2.0,
                                   tensors=[(k, c.encode(v)) for k, v in _update(cid).items()], chunk_bytes=4096)

    assert serde.call_upload(ch, wire(1), token=client_token(SECRET, JOB, 1))["accepted"]
    res = serde.call_upload_batch(ch, [(wire(2), client_token(SECRET, JOB, 2)), (wire(3), client_token(SECRET, JOB, 3))])
    assert [r.accepted for r in res] == [True, True] and res[0].wire_bytes == wire(2).nbytes
    good = list(wire(4).messages())
    for bad in ([b"\x12\xff\xff"], [good[0], b"\x0b\x00"], [good[0], good[1][:-3]] + good[2:]):
        assert _code(lambda: serde.call_upload(ch, bad, token=client_token(SECRET, JOB, 4), job_id=JOB, client_id=4)) == \
            grpc.StatusCode.INVALID_ARGUMENT
    part = core.close_round(1)
    assert part["count"] == 3 and part["total_weight"] == 6.0


def test_crc32_digests_of_older_clients_still_verify(service):
    """Clients from before digest_kind send zlib CRC-32 (kind 0): accepted when it matches,
    refused when the bytes do not; an unknown kind is refused."""
    import zlib

    core, ch = service
    msgs = _msgs(_update(5), client_id=5)
    msgs[0].header.digest_kind = 0
    msgs[0].header.digest = zlib.crc32(b"".join(m.data for m in msgs)).to_bytes(4, "big")
    assert _send(ch, msgs, client_id=5)["accepted"]
    bad = _msgs(_update(6), client_id=6)
    bad[0].header.digest_kind = 0  # the CRC-32C value read as a CRC-32: a mismatch
    assert _code(lambda: _send(ch, bad, client_id=6)) == grpc.StatusCode.INVALID_ARGUMENT
    odd = _msgs(_update(7), client_id=7)
    odd[0].header.digest_kind = 7
    with pytest.raises(grpc.RpcError) as e:
        _send(ch, odd, client_id=7)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "digest_kind" in e.value.details()
    assert core.close_round(1)["count"] == 1


def test_uploads_past_the_inflight_limit_get_resource_exhausted_and_retry():
    """Two uploads stall mid-stream at max_inflight=2: a third is refused with RESOURCE_EXHAUSTED
    and a retry-after-ms hint; once the two finish, fedray's retrying client gets through."""
    import threading

    from fedray.workers.client import upload_with_retry

    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, limits=ServiceLimits(max_inflight=2))
    server, port = create_server(core, "127.0.0.1:0")
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
    core.open_round(1)
    go = threading.Event()

    def stalled(msgs):
        yield msgs[0]
        go.wait(30)
        yield from msgs[1:]

    done = []
    threads = [threading.Thread(target=lambda c=c: done.append(serde.call_upload(
        ch, stalled(_msgs(_update(c), client_id=c)), token=client_token(SECRET, JOB, c), timeout=30))) for c in (1, 2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while core._inflight < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as e:
        _send(ch, _msgs(_update(3), client_id=3), client_id=3)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert serde.retry_after_ms(e.value) and "in flight" in e.value.details()
    trailers = dict(e.value.trailing_metadata())  # gRPC's standard push-back and fedray's own hint
    assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"] == "50"
    threading.Timer(0.3, go.set).start()
    ack = upload_with_retry(ch, _msgs(_update(3), client_id=3), client_token(SECRET, JOB, 3), tries=20)
    for t in threads:
        t.join(10)
    assert ack["accepted"] and len(done) == 2 and all(a["accepted"] for a in done)
    assert core.close_round(1)["count"] == 3
    ch.close()
    server.stop(None)


def test_packed_batches_fall_back_for_servers_without_uploadpacked():
    """A server of an older fedray (no UploadPacked) answers UNIMPLEMENTED: the client sends the
    same updates again as a plain UploadBatch, and remembers to for that channel."""
    from concurrent import futures

    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    core.open_round(1)
    kinds = []
    upload = core.upload
    core.upload = lambda h, chunks, token: (kinds.append(h.digest_kind), upload(h, chunks, token))[1]
    sv = serde._Servicer(core, JOB, status_of)
    server = grpc.server(futures.ThreadPoolExecutor(4), options=serde.GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fedray.v1.Aggregation", {
        "UploadBatch": grpc.stream_unary_rpc_method_handler(
            sv.UploadBatch, request_deserializer=serde._parse_upload_chunk,
            response_serializer=lambda m: m.SerializeToString())}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
    c = get_codec("int8")
    try:
        for cid in (1, 2):
            w = serde.encode_upload(job_id=JOB, round=1, client_id=cid, weight=1.0,
                                    tensors=[(k, c.encode(v)) for k, v in _update(cid).items()])
            assert serde.call_upload_batch(ch, [(w, client_token(SECRET, JOB, cid))])[0].accepted
        assert ch in serde._NO_PACKED and core.close_round(1)["count"] == 2
        assert kinds == [0, 0]  # such a server predates digest_kind: it got CRC-32 digests
        import zlib

        old = w.with_digest(serde.DIGEST_CRC32)
        assert old.header.digest_kind == 0
        assert old.header.digest == zlib.crc32(b"".join(bytes(c) for c in w.chunks)).to_bytes(4, "big")
    finally:
        ch.close()
        server.stop(None)


def test_an_upload_that_beats_the_round_open_waits_for_it():
    """The driver opens a round without waiting for the shard's answer: an upload for the next
    round waits (bounded) for the open; one for any other round is refused at once."""
    import threading

    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    core.open_round(1)
    core.close_round(1)
    timer = threading.Timer(0.3, core.open_round, args=(2,))
    timer.start()
    t0 = time.monotonic()
    _upload_in_process_round(core, 2)
    assert 0.2 < time.monotonic() - t0 < 4 and core.committed(2) == 1
    with pytest.raises(RoundClosedError):  # round 3 is not next while 2 is open
        _upload_in_process_round(core, 3)
    core.close_round(2)
    core._open_wait_s = 0.2
    t0 = time.monotonic()
    with pytest.raises(RoundNotOpenYetError) as e:  # next, but not opened in time: retryable
        _upload_in_process_round(core, 3)
    assert time.monotonic() - t0 >= 0.2 and status_of(e.value) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(RoundClosedError):  # stale: refused without waiting
        _upload_in_process_round(core, 1)


def _upload_in_process_round(core, rnd, cid=1):
    msgs = _msgs(_update(cid), client_id=cid, round=rnd)
    return core.upload(serde._header(msgs[0].header), ((m.offset, m.data) for m in msgs), client_token(SECRET, JOB, cid))


def test_unary_calls_are_retried_by_the_channel_after_the_servers_pushback(monkeypatch):
    """GetJob refused once with UNAVAILABLE and a 300 ms push-back: the channel's retryPolicy
    (serde.open_channel) replays it after the push-back, with no retry loop of fedray's own."""
    from fedray.orchestrator.service import RoundNotOpenYetError

    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    server, port = create_server(core, "127.0.0.1:0")
    calls, real = [], core.get_job

    def flaky(*args, **kw):
        calls.append(time.monotonic())
        if len(calls) == 1:
            e = RoundNotOpenYetError("warming up")
            e.retry_after_ms = 300
            raise e
        return real(*args, **kw)

    monkeypatch.setattr(core, "get_job", flaky)
    ch = serde.open_channel(f"127.0.0.1:{port}")
    info = serde.call_get_job(ch, job_id=JOB, client_id=1, token=client_token(SECRET, JOB, 1))
    assert info.job_id == JOB and len(calls) == 2
    assert calls[1] - calls[0] >= 0.25  # the server's push-back, not the policy's 0.1 s back-off
    ch.close()
    server.stop(None)


def _server_with(core, **methods):
    """A server of only some Aggregation methods (an older fedray), behind no credential gate."""
    from concurrent import futures

    sv = serde._Servicer(core, JOB, status_of)
    parse = serde._parse_upload_chunk
    kinds = {"Upload": grpc.stream_unary_rpc_method_handler, "UploadOne": grpc.unary_unary_rpc_method_handler}
    handlers = {m: kinds[m](getattr(sv, m), request_deserializer=parse, response_serializer=lambda a: a.SerializeToString())
                for m in methods}
    server = grpc.server(futures.ThreadPoolExecutor(4), options=serde.GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fedray.v1.Aggregation", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)


def _wire(cid: int, chunk_bytes: int = serde.CHUNK_BYTES):
    c = get_codec("int8")
    return serde.encode_upload(job_id=JOB, round=1, client_id=cid, weight=float(cid), chunk_bytes=chunk_bytes,
                               tensors=[(k, c.encode(v)) for k, v in _update(cid).items()])


def test_one_message_updates_go_in_one_unary_call():
    """An update of one chunk goes as UploadOne (a server serving only that method takes it),
    with the same ack and wire bytes as streamed; one of several chunks streams (Upload)."""
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    core.open_round(1)
    server, ch = _server_with(core, UploadOne=True)
    try:
        w = _wire(1)
        ack = serde.call_upload(ch, w, token=client_token(SECRET, JOB, 1))
        assert ack["accepted"] and ack["client_id"] == 1 and ack["wire_bytes"] == w.nbytes
        assert ch not in serde._NO_ONE
        assert _code(lambda: serde.call_upload(ch, _wire(2, chunk_bytes=4096), token=client_token(SECRET, JOB, 2))) \
            == grpc.StatusCode.UNIMPLEMENTED  # several chunks: Upload, which this server lacks
        out = core.close_round(1)
        assert out["count"] == 1
    finally:
        ch.close()
        server.stop(None)
    streamed = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    streamed.open_round(1)
    server, ch = _server_with(streamed, Upload=True)
    try:
        serde.call_upload(ch, w, token=client_token(SECRET, JOB, 1))
        want = streamed.close_round(1)
    finally:
        ch.close()
        server.stop(None)
    assert want["count"] == 1 and all(torch.equal(out["sums"][k], want["sums"][k]) for k in SHAPES)


def test_one_message_uploads_fall_back_for_servers_without_uploadone():
    """A server of an older fedray (no UploadOne) answers UNIMPLEMENTED: the update streams
    instead (Upload), and the channel remembers it."""
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    core.open_round(1)
    server, ch = _server_with(core, Upload=True)
    try:
        for cid in (1, 2):
            w = _wire(cid)
            ack = serde.call_upload(ch, w, token=client_token(SECRET, JOB, cid))
            assert ack["accepted"] and ack["wire_bytes"] == w.nbytes
        assert ch in serde._NO_ONE and core.close_round(1)["count"] == 2
    finally:
        ch.close()
        server.stop(None)


def test_a_malformed_one_message_upload_is_refused_and_adds_nothing(service):
    """UploadOne with bytes that are no UploadChunk, or a chunk without its header: INVALID_ARGUMENT
    with a message; the round's sum is untouched and a good update still counts."""
    core, ch = service
    md = serde.credentials(JOB, 7, client_token(SECRET, JOB, 7))
    one = ch.unary_unary("/fedray.v1.Aggregation/UploadOne")
    for bad in (b"\xff\xff\xff\x01garbage", b"\x12\x03abc"):
        with pytest.raises(grpc.RpcError) as e:
            one(bad, metadata=md, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details()
    assert core.committed(1) == 0
    assert serde.call_upload(ch, _wire(7), token=client_token(SECRET, JOB, 7))["accepted"]
    assert core.close_round(1)["count"] == 1
