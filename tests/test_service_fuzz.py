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
        with pytest.raises(grpc.RpcError) as e:
            serde.call_upload(ch, msgs, token=token, timeout=10)
        assert e.value.code() == want, (name, e.value.code(), e.value.details())
        seen[name] = seen.get(name, 0) + 1
    assert len(seen) == len(muts), f"mutations never drawn: {set(m[0] for m in muts) - set(seen)}"
    assert serde.call_health(ch).status == "SERVING"
    part = core.close_round(1)
    assert part["count"] == len(committed) == 20
    for k in SHAPES:
        assert torch.equal(part["sums"][k], ref.sums[k]), k
