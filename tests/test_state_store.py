"""CodecStateStore: error-feedback memory only for clients that trained, within a byte budget."""

from __future__ import annotations

import pytest
import torch

from fedray.compression import CodecContext, CodecState, CodecStateStore, get_codec


def test_store_keeps_recent_states_within_budget_and_drops_the_oldest():
    ef = get_codec("ef", inner="scaled_sign")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))  # a residual of 4,000 bytes
    store = CodecStateStore(max_bytes=10_000)
    for cid in range(5):
        ef.encode(x, CodecContext(seed=cid, state=store.setdefault(cid, CodecState()), key="w"))
    # Two 4,000-byte residuals fit in 10,000 bytes (a third is counted when the next call settles it).
    assert store.evicted == 2 and list(store._states) == [2, 3, 4]
    store.setdefault(0, CodecState())  # client 0 was dropped: it starts again from an empty state
    assert store.evicted == 3 and list(store._states) == [3, 4, 0] and store.nbytes() <= 10_000
    assert store.get(0).residuals == {}
    # A client that stays in the store keeps its residual: its next encode differs from a fresh one.
    kept = store.get(4)
    assert kept is not None and kept.residuals["w"].abs().sum() > 0
    with_memory = ef.encode(x, CodecContext(seed=9, state=store.setdefault(4, CodecState()), key="w"))
    fresh = ef.encode(x, CodecContext(seed=9, state=CodecState(), key="w"))
    assert bytes(memoryview(with_memory.data)) != bytes(memoryview(fresh.data))


def test_store_touch_order_is_lru():
    store = CodecStateStore(max_bytes=2 * 400)
    t = lambda: CodecState(residuals={"w": torch.zeros(100)})  # noqa: E731  400 bytes
    store.setdefault("a", t())
    store.setdefault("b", t())
    store.setdefault("a", t())  # a is now the most recent
    store.setdefault("c", t())
    store.setdefault("d", t())  # counts c: 1,200 bytes, over budget; b is the least recently used
    assert list(store._states) == ["a", "c", "d"] and store.evicted == 1
    with pytest.raises(ValueError, match="max_bytes"):
        CodecStateStore(max_bytes=0)
