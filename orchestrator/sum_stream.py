"""A shard's closed running sum, sent to the driver as float32 pieces of the round's mean.

Returned whole, a shard's float64 partial sum went through Ray's object store: the shard wrote
2x the fp32 model into shared pages that stayed in its resident set (a 100M-parameter model's
shard peaked at 4.4x fp32 above its fixed overhead, benchmarks/big_model.py), and the driver
mapped those pages and copied them out (read-only) before dividing. Instead the shard answers
`close_round` with counters only and keeps the sum; the driver, knowing the total weight of all
shards, asks each shard for `pieces`: slices of sum / total_weight cast to float32, each small
enough that Ray sends it inline in its reply (under `max_direct_call_object_size`), so nothing
of the sum enters the object store, and the driver writes them into one float32 buffer per
tensor (`receive`). With one shard the result is bit-identical to `RunningWeightedSum.mean()`;
with several, the shards' float32 shares are added in shard order (within a few float32 ulps
of the float64 merge, and as deterministic).

Models under `STREAM_MIN_BYTES` keep the old path (the sum returned whole). The shard frees the sum when the driver releases the round or opens the next one, so a shard
that dies mid-stream is restarted and the whole stream is taken again (engine `_close`).
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping

import numpy as np
import torch

__all__ = ["STREAM_MIN_BYTES", "StreamedMean", "piece_elements", "pieces", "receive"]

# Models smaller than this (float32 bytes) return their sum whole from close_round, as before: a
# stream costs a Ray round trip per 98 KiB piece (~0.3-0.6 ms each), which a 1M-parameter model's
# round would feel, and the object store holds at most 2x this of the sum for the round.
STREAM_MIN_BYTES = 16 << 20

_INLINE_DEFAULT = 100 * 1024  # Ray's default max_direct_call_object_size
_PICKLE_ROOM = 2048  # the tensor name, offset and pickle framing travel with each piece


def piece_elements() -> int:
    """Float32 elements per piece: a multiple of 512 that Ray still sends inline."""
    try:  # Ray reads its system config from RAY_<name> (Python has no accessor for this one)
        limit = int(os.environ.get("RAY_max_direct_call_object_size", _INLINE_DEFAULT))
    except ValueError:
        limit = _INLINE_DEFAULT
    return max(512, (limit - _PICKLE_ROOM) // 4 // 512 * 512)


def pieces(sums: Mapping[str, torch.Tensor], total_weight: float, n: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """(tensor name, flat offset, float32 slice of sum / total_weight) for every `n` elements of
    every tensor, in the sums' order: the same arithmetic as `RunningWeightedSum.mean()`."""
    if not total_weight > 0:
        raise ValueError(f"total_weight must be > 0, got {total_weight}")
    for k, s in sums.items():
        flat = s.reshape(-1)
        for a in range(0, flat.numel(), n):
            yield k, a, (flat[a:a + n] / total_weight).to(torch.float32).numpy()


def receive(items: Iterator[tuple[str, int, np.ndarray]], out: Mapping[str, torch.Tensor], *, add: bool) -> int:
    """Write (`add`: add) each piece into `out`'s float32 tensors; returns the elements received.

    Raises:
        ValueError: a piece names an unknown tensor or falls outside it.
    """
    flat = {k: v.view(-1).numpy() for k, v in out.items()}
    got = 0
    for k, a, x in items:
        dst = flat.get(k)
        if dst is None or a < 0 or a + len(x) > len(dst):
            raise ValueError(f"sum piece for tensor {k!r} at {a} (+{len(x)}) does not fit the model")
        view = dst[a:a + len(x)]
        if add:
            np.add(view, x, out=view)
        else:
            np.copyto(view, x)
        got += len(x)
    return got


class StreamedMean:
    """The round's weighted mean, assembled by the driver from the shards' pieces: the
    `mean()` / `count` / `total_weight` surface that a `WeightedMean` reducer reads."""

    def __init__(self, means: dict[str, torch.Tensor], total_weight: float, count: int) -> None:
        self.means, self.total_weight, self.count = means, total_weight, count

    def mean(self) -> dict[str, torch.Tensor]:
        """The float32 means themselves (not copies).

        Raises:
            ValueError: nothing was added.
        """
        if self.count == 0:
            raise ValueError("no updates were aggregated")
        return self.means
