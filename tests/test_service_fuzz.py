"""10,000 malformed or hostile requests against a live gRPC service: each is refused with the
right status, the server stays up, and the aggregate is bit-identical to a run without them."""

from __future__ import annotations

import copy

import grpc
import numpy as np
import pytest
import torch

from fedray.compression import get_codec
from fedray.orchestrator.aggregation import RunningWeightedSum
from fedray.orchestrator.service import AggregationCore, ServiceLimits, create_server
from fedray.proto import serde
from fedray.proto.auth import client_token

JOB, SECRET = "fuzz-job", "fuzz-secret"
SHAPES = {"w": (16, 32), "b": (16,)}
N_HOSTILE = 10_000
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _redigest(msgs):
    h = serde.new_digest()
    for m in msgs:
        h.update(m.data)
    msgs[0].header.digest = h.digest()
    return msgs


def _set_float(msgs, pos, value):
    data = bytearray(msgs[0].data)
    data[pos : pos + 4] = np.array([value], np.float32).tobytes()
    msgs[0].data = bytes(data)
    return _redigest(msgs)


def _mutations(rng):
    """(name, mutate(msgs) -> msgs or None, token kind, expected status)."""

    def bit_flip(m):
        d = bytearray(m[0].data)
        i = int(rng.integers(len(d)))
        d[i] ^= 1 << int(rng.integers(8))
        m[0].data = bytes(d)
        return m

    def truncate(m):
        m[-1].data = m[-1].data[: int(rng.integers(len(m[-1].data)))]
        return m

    def extend(m):
        m[-1].data += bytes(int(rng.integers(1, 64)))
        return m

    def bad_offset(m):
        m[0].offset = int(rng.integers(1, 1 << 20))
        return m

    def huge_shape(m):
        m[0].header.tensors[0].shape[:] = [1 << 20, 1 << 20]
        return m

    def wrong_shape(m):
        m[0].header.tensors[0].shape[:] = [16, int(rng.integers(33, 64))]
        return m

    def unknown_codec(m):
        m[0].header.tensors[int(rng.integers(2))].codec = f"codec{int(rng.integers(1000))}"
        return m

    def bad_version(m):
        m[0].header.tensors[0].codec_version = int(rng.integers(2, 100))
        return m

    def oversize(m):
        m[0].header.tensors[0].nbytes = int(rng.integers(1 << 21, 1 << 40))
        return m

    def no_header(m):
        m[0].ClearField("header")
        return m

    def bad_weight(m):
        m[0].header.weight = float(rng.choice([0.0, -1.0, np.nan, np.inf, 1e300]))
        return m

    def bad_rows(m):
        m[0].header.tensors[0].params["rows"].i = int(rng.choice([0, -3, 17, 1 << 40]))
        return m

    def rows_wrong_type(m):
        m[0].header.tensors[0].params["rows"].s = "one"
        return m

    def missing_tensor(m):
        del m[0].header.tensors[1]
        return m

    def duplicate_tensor(m):
        m[0].header.tensors[1].name = "w"
        return m

    def nan_scale(m):
        return _set_float(m, 0, float(rng.choice([np.nan, np.inf, -np.inf, -1.0])))

    def stale_round(m):
        m[0].header.round = int(rng.choice([0, 2, 99]))
        return m

    return [
        ("bit_flip", bit_flip, "ok", INVALID), ("truncate", truncate, "ok", INVALID), ("extend", extend, "ok", INVALID),
        ("bad_offset", bad_offset, "ok", INVALID), ("huge_shape", huge_shape, "ok", INVALID),
        ("wrong_shape", wrong_shape, "ok", INVALID), ("unknown_codec", unknown_codec, "ok", INVALID),
        ("bad_version", bad_version, "ok", INVALID), ("oversize", oversize, "ok", INVALID),
        ("no_header", no_header, "ok", INVALID), ("bad_weight", bad_weight, "ok", INVALID),
        ("bad_rows", bad_rows, "ok", INVALID), ("rows_wrong_type", rows_wrong_type, "ok", INVALID),
        ("missing_tensor", missing_tensor, "ok", INVALID), ("duplicate_tensor", duplicate_tensor, "ok", INVALID),
        ("nan_scale", nan_scale, "ok", INVALID),
        ("stale_round", stale_round, "ok", grpc.StatusCode.FAILED_PRECONDITION),
        ("no_token", lambda m: m, "none", grpc.StatusCode.UNAUTHENTICATED),
        ("forged_token", lambda m: m, "forged", grpc.StatusCode.UNAUTHENTICATED),
        ("other_job", lambda m: _other_job(m), "other_job", grpc.StatusCode.PERMISSION_DENIED),
        ("replay", lambda m: m, "replay", grpc.StatusCode.ALREADY_EXISTS),
    ]


def _other_job(m):
    m[0].header.job_id = "another-job"
    return m


@pytest.fixture(scope="module")
def live():
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, limits=ServiceLimits(max_update_bytes=1 << 20))
    server, port = create_server(core, "127.0.0.1:0", max_workers=4)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
    yield core, ch
    ch.close()
    server.stop(None)


def test_ten_thousand_hostile_requests(live):
    core, ch = live
    rng = np.random.default_rng(2024)
    codec = get_codec("int8")
    core.open_round(1)
    ref = RunningWeightedSum(SHAPES)
    muts = _mutations(rng)
    templates = []
    for i in range(8):  # a few encoded updates to mutate (encoding 10k fresh ones would dominate)
        u = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
        templates.append(serde.upload_messages(job_id=JOB, round=1, client_id=0, weight=3.0,
                                               tensors=[(k, codec.encode(v)) for k, v in u.items()], chunk_bytes=256))
    good_ids = list(range(1, 21))
    committed: list[int] = []
    seen: dict[str, int] = {}
    for n in range(N_HOSTILE):
        if n % 500 == 0 and good_ids:  # interleave real updates
            cid = good_ids.pop(0)
            msgs = copy.deepcopy(templates[cid % len(templates)])
            msgs[0].header.client_id = cid
            serde.call_upload(ch, msgs, token=client_token(SECRET, JOB, cid))
            p = {t.name: serde.payload_from_meta(t) for t in msgs[0].header.tensors}
            data = memoryview(b"".join(m.data for m in msgs))
            off = 0
            folds = {}  # what a service that saw only the good updates adds (Codec.fold)
            for t in msgs[0].header.tensors:
                q = p[t.name]
                folds[t.name] = codec.fold(type(q)(q.codec, q.version, q.dtype, q.shape, q.params, data[off: off + t.nbytes]))
                off += t.nbytes
            ref.add_folds(folds, 3.0)
            committed.append(cid)
        name, mutate, tok, want = muts[int(rng.integers(len(muts)))]
        cid = int(committed[int(rng.integers(len(committed)))]) if tok == "replay" else 10_000 + n
        msgs = copy.deepcopy(templates[n % len(templates)])
        msgs[0].header.client_id = cid
        msgs = mutate(msgs)
        token = {"ok": client_token(SECRET, JOB, cid), "replay": client_token(SECRET, JOB, cid), "none": "",
                 "forged": client_token("wrong-secret", JOB, cid), "other_job": client_token(SECRET, "another-job", cid)}[tok]
        with pytest.raises(grpc.RpcError) as e:  # the call's credentials name the client (no_header has no header)
            serde.call_upload(ch, msgs, token=token, timeout=10, client_id=cid,
                              job_id="another-job" if tok == "other_job" else JOB)
        assert e.value.code() == want, (name, e.value.code(), e.value.details())
        seen[name] = seen.get(name, 0) + 1
    assert len(seen) == len(muts), f"mutations never drawn: {set(m[0] for m in muts) - set(seen)}"
    assert serde.call_health(ch).status == "SERVING"
    part = core.close_round(1)
    assert part["count"] == len(committed) == 20
    for k in SHAPES:
        assert torch.equal(part["sums"][k], ref.sums[k]), k


def test_concurrent_hostile_batches_packs_downloads_and_health():
    """Eight threads at once, each mixing good and hostile updates in UploadBatch and UploadPacked
    calls (forged and non-ASCII tokens, bad bytes, a malformed pack), token-less and forged
    Downloads, and Health: every result pairs with its client id and carries the right status,
    and the aggregate is bit-identical to the good updates alone."""
    import threading

    from fedray.workers.broadcast import make_broadcast

    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, limits=ServiceLimits(max_update_bytes=1 << 20))
    server, port = create_server(core, "127.0.0.1:0")
    core.open_round(1, make_broadcast({k: torch.zeros(s) for k, s in SHAPES.items()}, codec="identity",
                                      codec_params={}, round=1))
    codec = get_codec("int8")
    rng = np.random.default_rng(7)
    u = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    tensors = [(k, codec.encode(v)) for k, v in u.items()]

    def wire(cid, weight=2.0):
        return serde.encode_upload(job_id=JOB, round=1, client_id=cid, weight=weight, tensors=tensors)

    errors: list[str] = []
    good: list[int] = []
    lock = threading.Lock()

    def sender(t: int):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS + (("grpc.use_local_subchannel_pool", 1),))
        try:
            for rep in range(6):
                base = 1000 * (t + 1) + 10 * rep
                batch = [(wire(base + 0), client_token(SECRET, JOB, base + 0)),
                         (wire(base + 1), client_token("forged", JOB, base + 1)),
                         (wire(base + 2), "\u00e9" * 20),
                         (wire(base + 3, weight=-1.0), client_token(SECRET, JOB, base + 3)),
                         (wire(base + 4), client_token(SECRET, JOB, base + 4))]
                if rep % 2:  # big enough to go as UploadBatch rather than packed
                    batch = [(serde.upload_messages(job_id=JOB, round=1, client_id=w.header.client_id,
                                                    weight=w.header.weight, tensors=tensors), tok) for w, tok in batch]
                want = [grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                        INVALID, grpc.StatusCode.OK]
                res = serde.call_upload_batch(ch, list(reversed(batch)), timeout=30)  # order must not matter
                got = {r.client_id: r.code for r in res}
                exp = {base + i: w for i, w in enumerate(want)}
                if got != exp:
                    errors.append(f"thread {t} rep {rep}: {got} != {exp}")
                with lock:
                    good.extend([base + 0, base + 4])
                for tok, code in (("", grpc.StatusCode.UNAUTHENTICATED),
                                  (client_token("forged", JOB, 5), grpc.StatusCode.UNAUTHENTICATED),
                                  (client_token(SECRET, "another-job", 5), grpc.StatusCode.UNAUTHENTICATED)):
                    try:
                        serde.call_download(ch, job_id=JOB, round=1, client_id=5, token=tok, timeout=10)
                        errors.append("download without a valid token succeeded")
                    except grpc.RpcError as e:
                        if e.code() != code:
                            errors.append(f"download: {e.code()} != {code}")
                if serde.call_health(ch).status != "SERVING":
                    errors.append("health")
            # a malformed pack: one result for the whole message, which pairs with no update
            stub = ch.stream_unary("/fedray.v1.Aggregation/UploadPacked", request_serializer=lambda b: b,
                                   response_deserializer=serde.pb.UploadBatchAck.FromString)
            ack = stub(iter([b"\x0a\x05\xff\xff\xff\xff\xff"]), timeout=10,
                       metadata=serde.credentials(JOB, 5, client_token(SECRET, JOB, 5)))
            if [r.code for r in ack.results] != [INVALID.value[0]]:
                errors.append(f"malformed pack: {ack}")
        except Exception as e:  # a failure in a thread must fail the test
            errors.append(f"thread {t}: {type(e).__name__}: {e}")
        finally:
            ch.close()

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(8)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors[:5]
        ok = serde.call_download(grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS), job_id=JOB,
                                 round=1, client_id=5, token=client_token(SECRET, JOB, 5))
        assert len(ok) == 1
        part = core.close_round(1)
        assert part["count"] == len(good) == 8 * 6 * 2
        ref = RunningWeightedSum(SHAPES)
        folds = {}
        w = wire(0)
        data, off = memoryview(b"".join(bytes(c) for c in w.chunks)), 0
        for t in w.header.tensors:
            p = serde.payload_from_meta(t)
            folds[t.name] = codec.fold(type(p)(p.codec, p.version, p.dtype, p.shape, p.params, data[off: off + t.nbytes]))
            off += t.nbytes
        for _ in good:
            ref.add_folds(folds, 2.0)
        for k in SHAPES:
            assert torch.equal(part["sums"][k], ref.sums[k]), k
    finally:
        server.stop(None)


def test_batch_results_pair_by_client_id_when_the_server_answers_fewer():
    """A server that answers fewer updates than were sent (its max_batch_updates) leaves the rest
    UNAVAILABLE (send again), never shifted onto other clients' results."""
    core = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES, limits=ServiceLimits(max_batch_updates=2))
    server, port = create_server(core, "127.0.0.1:0")
    core.open_round(1)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=serde.GRPC_OPTIONS)
    codec = get_codec("int8")
    tensors = [(k, codec.encode(torch.ones(s))) for k, s in SHAPES.items()]
    try:
        ups = [(serde.encode_upload(job_id=JOB, round=1, client_id=c, weight=1.0, tensors=tensors),
                client_token(SECRET, JOB, c)) for c in (11, 12, 13, 14)]
        res = serde.call_upload_batch(ch, ups)
        assert [(r.client_id, r.code) for r in res] == [
            (11, grpc.StatusCode.OK), (12, grpc.StatusCode.OK), (13, grpc.StatusCode.UNAVAILABLE),
            (14, grpc.StatusCode.UNAVAILABLE)]
        assert core.committed(1) == 2
    finally:
        ch.close()
        server.stop(None)
