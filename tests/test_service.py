"""The aggregation service over real gRPC on 127.0.0.1, port 0."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from fedray.compression import get_codec
from fedray.orchestrator.service import AggregationCore, ServiceLimits, create_server
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
    return serde.call_upload(channel, msgs, token=client_token(SECRET, JOB, client_id) if token is None else token)


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
    ref = AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)
    ref.open_round(1)
    c = get_codec("int8")
    from fedray.orchestrator.aggregation import RunningWeightedSum

    oracle = RunningWeightedSum(SHAPES)
    oracle.add({k: c.decode(c.encode(v)) for k, v in good.items()}, 10.0)
    for k in SHAPES:
        assert torch.equal(part["sums"][k], oracle.sums[k])


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
    assert h.status == "SERVING" and h.round == 2


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
