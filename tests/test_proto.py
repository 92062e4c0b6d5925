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
