"""An update over 2 GiB (protobuf's cap on one message) streams through a live service.

One float32 tensor of 2.28 GB goes up as ~2,200 chunks of 1 MB: the client frames chunks as it
sends them (no copy of the payload held), the shard assembles the spanning tensor chunk by
chunk into one buffer of its declared size and folds it into the float64 sum. About 20 s and
9 GiB in all (client tensor 2.3 GB, shard buffer 2.3 GB, float64 sum 4.6 GB).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedray.compression import get_codec
from fedray.orchestrator.service import AggregationCore, create_server
from fedray.proto import serde
from fedray.proto.auth import client_token

N = (1 << 29) + (1 << 25)  # 570,425,344 float32 = 2.28 GB, more than 2 GiB = 2.147 GB
PERIOD = 4096


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.skipif(_mem_available() < 12 << 30, reason="needs 12 GiB of free memory (tensor, buffer and sum)")
def test_an_update_over_2_gib_is_received_and_aggregated():
    pattern = np.arange(PERIOD, dtype=np.float32) - PERIOD / 2  # a chunk out of place would show
    x = np.resize(pattern, N)
    assert 4 * N > 2**31
    core = AggregationCore(job_id="big", secret="s", shapes={"w": (N,)})
    core.open_round(1)
    server, port = create_server(core, "127.0.0.1:0")
    ch = serde.open_channel(f"127.0.0.1:{port}")
    try:
        up = serde.encode_upload(job_id="big", round=1, client_id=1, weight=2.0,
                                 tensors=[("w", get_codec("identity").encode(torch.from_numpy(x)))])
        del x
        ack = serde.call_upload(ch, up, token=client_token("s", "big", 1), timeout=600)
        assert ack["accepted"] and ack["bytes_received"] == 4 * N and ack["wire_bytes"] == up.nbytes > 2**31
        del up
        part = core.close_round(1)
        assert part["count"] == 1 and part["bytes_received"] == 4 * N
        rows = part["sums"]["w"].view(-1, PERIOD)
        want = 2.0 * torch.from_numpy(pattern).double()
        for s in range(0, rows.shape[0], 8192):
            assert torch.equal(rows[s : s + 8192], want.expand(min(8192, rows.shape[0] - s), PERIOD))
    finally:
        ch.close()
        server.stop(None)
