"""The committed generated code matches the .proto sources, and serde round-trips."""

from pathlib import Path

import numpy as np
import torch

from fedray.compression import get_codec
from fedray.proto import generate, serde


def test_generated_code_has_no_drift(tmp_path: Path):
    written = generate.generate(tmp_path)
    for f in written:
        committed = generate.GENERATED / f.name
        assert committed.is_file(), f"{f.name} is not committed; run python -m fedray.proto.generate"
        assert committed.read_text() == f.read_text(), (
            f"{f.name} differs from the .proto sources; run python -m fedray.proto.generate"
        )
    assert "DO NOT EDIT" in (generate.GENERATED / "aggregation_pb2.py").read_text()


def test_upload_messages_chunk_and_carry_metadata():
    codec = get_codec("int8", granularity="channel")
    rng = np.random.default_rng(0)
    tensors = [(f"t{i}", codec.encode(torch.from_numpy(rng.standard_normal((300, 1000)).astype(np.float32)))) for i in range(4)]
    msgs = serde.upload_messages(job_id="j", round=3, client_id=7, weight=12.0, tensors=tensors, chunk_bytes=1 << 20)
    total = sum(p.nbytes for _, p in tensors)
    assert sum(len(m.data) for m in msgs) == total
    assert all(len(m.data) == 1 << 20 for m in msgs[:-1])
    assert msgs[0].HasField("header") and not any(m.HasField("header") for m in msgs[1:])
    assert [m.offset for m in msgs] == list(np.cumsum([0] + [len(m.data) for m in msgs[:-1]]))
    h = msgs[0].header
    assert (h.job_id, h.round, h.client_id, h.weight) == ("j", 3, 7, 12.0)
    meta = h.tensors[1]
    p = serde.payload_from_meta(meta)
    assert p.params == tensors[1][1].params and p.shape == (300, 1000) and meta.nbytes == tensors[1][1].nbytes


def _random_chunk(rng: np.random.Generator):
    from fedray.proto._generated import aggregation_pb2 as pb

    m = pb.UploadChunk(data=rng.bytes(int(rng.integers(0, 3000))), offset=int(rng.integers(0, 2**40)))
    if rng.random() < 0.5:
        m.header.job_id = "j"
        m.header.client_id = int(rng.integers(0, 2**63))
        m.header.weight = float(rng.random())
        m.header.tensors.add(name="w", codec="int8", shape=[3, 4], nbytes=16)
    return m


def test_zero_copy_chunk_parser_agrees_with_protobuf():
    from fedray.proto._generated import aggregation_pb2 as pb

    rng = np.random.default_rng(0)
    for _ in range(300):
        m = _random_chunk(rng)
        wire = m.SerializeToString()
        got = serde._parse_upload_chunk(wire)
        assert got.error is None
        assert bytes(got.data) == m.data and got.offset == m.offset
        assert got.HasField("header") == m.HasField("header")
        if m.HasField("header"):
            assert got.header == m.header
    # Repeated header fields merge and unknown fields are skipped, as protobuf does.
    a, b = pb.UploadChunk(), pb.UploadChunk()
    a.header.job_id, b.header.client_id = "j", 9
    unknown = b"\x20\x05" + b"\x2a\x02hi" + b"\x31" + bytes(8) + b"\x3d" + bytes(4)
    got = serde._parse_upload_chunk(a.SerializeToString() + unknown + b.SerializeToString())
    assert (got.header.job_id, got.header.client_id) == ("j", 9)
    # Garbage is reported, not raised (the servicer turns it into INVALID_ARGUMENT).
    for bad in (b"\x12\xff\xff\xff\xff\x0f", b"\x12\x05abc", b"\x0b", b"\x80" * 11, b"\x0a\x02\xff\xff"):
        assert serde._parse_upload_chunk(bad).error


def test_wire_upload_is_the_same_stream_as_upload_messages():
    codec = get_codec("int8")
    rng = np.random.default_rng(1)
    tensors = [(f"t{i}", codec.encode(torch.from_numpy(rng.standard_normal(s).astype(np.float32))))
               for i, s in enumerate([(700, 1000), (10,), (0,)])]
    kw = dict(job_id="j", round=2, client_id=5, weight=3.0, tensors=tensors, chunk_bytes=1 << 18)
    msgs, wire = serde.upload_messages(**kw), serde.encode_upload(**kw)
    framed = list(wire.messages(token="tok"))
    parsed = [serde._parse_upload_chunk(b) for b in framed]
    assert parsed[0].header.token == "tok" and not any(p.HasField("header") for p in parsed[1:])
    h = parsed[0].header
    h.ClearField("token")
    assert h == msgs[0].header  # digest, tensor metadata, everything
    assert [bytes(p.data) for p in parsed] == [m.data for m in msgs]  # the same chunks
    assert [p.offset for p in parsed] == [m.offset for m in msgs]
    assert wire.nbytes == sum(len(b) for b in wire.messages())
    # protobuf reads the framed bytes as the same messages
    from fedray.proto._generated import aggregation_pb2 as pb

    assert pb.UploadChunk.FromString(next(wire.messages())) == msgs[0]


def test_pack_parser_agrees_with_protobuf():
    from fedray.proto._generated import aggregation_pb2 as pb

    rng = np.random.default_rng(3)
    chunks = [_random_chunk(rng) for _ in range(20)]
    frames = [c.SerializeToString() for c in chunks]
    packs = list(serde._pack_frames(frames, limit=8000))
    assert len(packs) > 1
    got = [c for p in packs for c in serde._parse_upload_pack(p)]
    want = [c for p in packs for c in pb.UploadPack.FromString(p).chunks]
    assert len(got) == len(want) == 20
    for g, w in zip(got, want):
        assert g.error is None and bytes(g.data) == w.data and g.offset == w.offset
        assert g.HasField("header") == w.HasField("header") and (not w.HasField("header") or g.header == w.header)
    assert serde._parse_upload_pack(b"\x0a\x05ab")[-1].error


def test_chunk_parsers_bound_their_work_on_hostile_bytes():
    """They run before any token check: a message of a million tiny fields is refused after a
    few, in microseconds, not parsed field by field."""
    import time

    for parse in (serde._parse_upload_chunk, serde._parse_upload_pack):
        t0 = time.perf_counter()
        got = parse(b"\x0a\x00" * (1 << 20))
        got = got if isinstance(got, list) else [got]
        assert len(got) == 1 and got[0].error and time.perf_counter() - t0 < 0.05
    assert serde._parse_upload_chunk(b"\x02\x00").error  # field number 0
    # a pack with one bad entry is refused whole, as protobuf refuses the message
    good = serde._parse_upload_pack(b"".join(serde._pack_frames([b"\x18\x05"] * 3)))
    assert len(good) == 3 and not any(c.error for c in good)
    bad = serde._parse_upload_pack(b"".join(serde._pack_frames([b"\x18\x05", b"\x18"])))
    assert len(bad) == 1 and bad[0].error
    # many tiny updates still pack within the server's per-message cap
    assert all(len(serde._parse_upload_pack(p)) <= serde._PACK_ENTRIES
               for p in serde._pack_frames([b"\x18\x05"] * (3 * serde._PACK_ENTRIES)))
