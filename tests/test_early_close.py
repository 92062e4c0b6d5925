"""`AggregationCore.close_round(round, expect=N)`: the driver's close sent right after the
dispatch closes the round once N updates are committed, and hands the round back (None) when it
cannot: closed by a plain close, a later round, the job's end, or its wait running out."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from fedray.compression import get_codec
from fedray.orchestrator.service import AggregationCore, DuplicateUpdateError, RoundClosedError, status_of
from fedray.proto import serde
from fedray.proto.auth import client_token

SHAPES = {"w": (8, 5), "b": (8,)}
JOB, SECRET = "job-e", "s3cret"


def _upload(core, rnd, cid, attempt=0):
    rng = np.random.default_rng(cid)
    c = get_codec("int8")
    msgs = serde.upload_messages(job_id=JOB, round=rnd, client_id=cid, weight=float(cid), attempt=attempt,
                                 tensors=[(k, c.encode(torch.from_numpy(rng.standard_normal(s).astype(np.float32))))
                                          for k, s in SHAPES.items()])
    return core.upload(serde._header(msgs[0].header), ((m.offset, m.data) for m in msgs), client_token(SECRET, JOB, cid))


class _Closer(threading.Thread):
    def __init__(self, core, rnd, expect):
        super().__init__(daemon=True)
        self.core, self.rnd, self.expect, self.out, self.err = core, rnd, expect, "unset", None

    def run(self):
        try:
            self.out = self.core.close_round(self.rnd, expect=self.expect)
        except Exception as e:  # reported by the test
            self.err = e


def _core():
    return AggregationCore(job_id=JOB, secret=SECRET, shapes=SHAPES)


def test_closes_on_the_count_even_when_sent_before_the_open():
    core = _core()
    closer = _Closer(core, 1, 3)
    closer.start()  # before the open: Ray may run a threaded actor's calls out of order
    time.sleep(0.05)
    core.open_round(1)
    for cid in (1, 2):
        _upload(core, 1, cid)
    time.sleep(0.05)
    assert closer.is_alive()  # 2 of 3: still waiting, the round still open
    _upload(core, 1, 3)
    closer.join(5)
    assert closer.err is None and closer.out["count"] == 3 and closer.out["total_weight"] == 6.0
    with pytest.raises(RoundClosedError):
        core.close_round(1)
    # a retry of a counted update after the close: "already counted" (ALREADY_EXISTS), not a failure
    with pytest.raises(DuplicateUpdateError) as e:
        _upload(core, 1, 2, attempt=1)
    assert status_of(e.value) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(RoundClosedError):  # one that was never counted is refused as before
        _upload(core, 1, 4)


def test_a_plain_close_takes_over_when_clients_failed():
    core = _core()
    core.open_round(1)
    closer = _Closer(core, 1, 3)
    closer.start()
    _upload(core, 1, 1)
    _upload(core, 1, 2)  # the third client failed: the driver closes the round itself
    time.sleep(0.05)
    assert core.close_round(1)["count"] == 2
    closer.join(5)
    assert not closer.is_alive() and closer.err is None and closer.out is None


@pytest.mark.parametrize("how", ["timeout", "finish", "next_round"])
def test_gives_the_round_back_without_closing(how):
    core = _core()
    core._close_wait_s = 0.2 if how == "timeout" else 30.0
    core.open_round(1)
    closer = _Closer(core, 1, 5)
    closer.start()
    _upload(core, 1, 1)
    t0 = time.monotonic()
    if how == "finish":
        core.finish()
    elif how == "next_round":
        core.open_round(2)
    closer.join(10)
    assert not closer.is_alive() and closer.err is None and closer.out is None
    assert time.monotonic() - t0 < 5
    if how == "timeout":  # nothing was closed: the driver's own close gets the round whole
        assert core.close_round(1)["count"] == 1
