"""Aggregation math, pure tensor code (no Ray, no gRPC).

Two collectors fold client updates in as they arrive:

* `RunningWeightedSum` streams: O(model) memory whatever the number of clients. Sums are kept in
  float64 so that the order in which updates arrive changes the result only far below float32
  resolution: the same seed gives the same model whatever the arrival order.
* `BufferedUpdates` keeps every update, for the statistics that need them all (coordinate-wise
  median, trimmed mean, Krum). Its memory is bounded up front: max_clients x model bytes.

Reducers (`WeightedMean`, `CoordinateMedian`, `TrimmedMean`, `Krum`) turn a collector into one
aggregated delta; `clip_update` bounds one client's delta before it is folded in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Union

import torch

from fedray.compression import add_scaled_
from fedray.compression.accumulate import ScaledAdd, add_scaled_many_

__all__ = [
    "BufferFullError",
    "BufferedUpdates",
    "Collector",
    "CoordinateMedian",
    "FedAvg",
    "Krum",
    "Reducer",
    "RunningWeightedSum",
    "TrimmedMean",
    "WeightedMean",
    "clip_update",
]

Params = Mapping[str, torch.Tensor]

# Working memory of one reduction step over buffered updates: coordinates are processed in
# chunks so that the n x chunk stack (plus sort output and indices) stays near this size.
_WORK_BYTES = 64 << 20


def _check_update(update: Params, shapes: Mapping[str, tuple[int, ...]], weight: float) -> None:
    if not weight > 0 or not math.isfinite(weight):
        raise ValueError(f"update weight must be finite and > 0, got {weight}")
    if set(update) != set(shapes):
        raise ValueError(f"update tensors {sorted(update)} != expected {sorted(shapes)}")
    for k, x in update.items():
        if tuple(x.shape) != shapes[k]:
            raise ValueError(f"tensor {k!r}: shape {tuple(x.shape)} != expected {shapes[k]}")


class RunningWeightedSum:
    """sum_i w_i * x_i and sum_i w_i over updates folded in one at a time.

    Memory is O(model): one float64 buffer per tensor, whatever the number of clients.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._shapes = {k: tuple(s) for k, s in shapes.items()}
        self.sums = {k: torch.zeros(s, dtype=torch.float64) for k, s in self._shapes.items()}
        self._flat = {k: v.view(-1) for k, v in self.sums.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Params, weight: float) -> None:
        """Fold one update in.

        Raises:
            ValueError: tensor names or shapes differ from the template, or weight <= 0.
        """
        _check_update(update, self._shapes, weight)
        for k, x in update.items():
            add_scaled_(self._flat[k], x.detach().reshape(-1), weight)  # blockwise: no float64 temporary
        self.total_weight += weight
        self.count += 1

    def add_folds(self, folds: Mapping[str, Callable[[torch.Tensor, float], None]], weight: float) -> None:
        """Fold in one update given as one `add(acc, alpha)` per tensor (`Codec.fold`: each adds
        alpha x its decoded tensor into a float64 sum, straight from the payload's codes).

        Raises:
            ValueError: tensor names differ from the template, or weight <= 0.
        """
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"update weight must be finite and > 0, got {weight}")
        if set(folds) != set(self._shapes):
            raise ValueError(f"update tensors {sorted(folds)} != expected {sorted(self._shapes)}")
        flat = self._flat
        for k, add in folds.items():
            add(flat[k], weight)
        self.total_weight += weight
        self.count += 1

    def add_folds_many(self, updates: list[tuple[Mapping[str, Callable[[torch.Tensor, float], None]], float]]) -> None:
        """`add_folds(folds, weight)` for each update, in order, with each tensor's sum read and
        written once for all of them where the folds are `ScaledAdd`s (`add_scaled_many_`);
        bit-identical to the calls one by one. All updates are checked before any is added.

        Raises:
            ValueError: as `add_folds`, for any of the updates (then none is added).
        """
        for folds, weight in updates:
            if not weight > 0 or not math.isfinite(weight):
                raise ValueError(f"update weight must be finite and > 0, got {weight}")
            if set(folds) != set(self._shapes):
                raise ValueError(f"update tensors {sorted(folds)} != expected {sorted(self._shapes)}")
        for k, acc in self._flat.items():
            adds = [(folds[k], weight) for folds, weight in updates]
            if all(type(f) is ScaledAdd for f, _ in adds):
                add_scaled_many_(acc, [(f.src, w * f.scale) for f, w in adds])
            else:
                for f, w in adds:
                    f(acc, w)
        for _, weight in updates:
            self.total_weight += weight
            self.count += 1

    def __getstate__(self) -> dict:
        # The sums travel as numpy arrays: Ray's pickle 5 writes those straight into the object
        # store (out of band), where a torch tensor is first copied into the pickle stream, which
        # doubled a shard's peak memory at close_round for a large model (benchmarks/big_model.py).
        state = {k: v for k, v in self.__dict__.items() if k != "_flat"}
        state["sums"] = {k: v.numpy() for k, v in self.sums.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # arrays read from Ray's object store are read-only views of it: copy those (merge adds in place)
        self.sums = {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in self.sums.items()}
        self._flat = {k: v.view(-1) for k, v in self.sums.items()}

    def merge(self, other: "RunningWeightedSum") -> None:
        """Add another partial sum (e.g. another shard's) into this one."""
        for k in self.sums:
            self.sums[k].add_(other.sums[k])
        self.total_weight += other.total_weight
        self.count += other.count

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean as float32 tensors.

        Raises:
            ValueError: nothing was added.
        """
        if self.count == 0:
            raise ValueError("no updates were aggregated")
        return {k: (s / self.total_weight).to(torch.float32) for k, s in self.sums.items()}


class BufferFullError(RuntimeError):
    """A `BufferedUpdates` already holds `max_clients` updates."""


class BufferedUpdates:
    """Every update of a round, as float32 copies, for statistics that need them all.

    Memory is bounded: at most `max_clients` updates of `model_bytes` each (float32), i.e.
    `capacity_bytes`; reductions add about 64 MiB of working memory on top (see docs/strategies.md).
    Same `add` / `merge` / `mean` / `count` / `total_weight` surface as `RunningWeightedSum`.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, max_clients: int,
                 max_bytes: int | None = None) -> None:
        """
        Raises:
            ValueError: max_clients < 1, or max_clients x model bytes is more than max_bytes.
        """
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ValueError(f"max_clients must be an integer >= 1, got {max_clients!r}")
        self._shapes = {k: tuple(s) for k, s in shapes.items()}
        self.max_clients = max_clients
        self.model_bytes = 4 * sum(math.prod(s) for s in self._shapes.values())
        self.capacity_bytes = max_clients * self.model_bytes
        if max_bytes is not None and self.capacity_bytes > max_bytes:
            raise ValueError(
                f"buffering {max_clients} updates of {self.model_bytes / 2**20:.1f} MiB needs "
                f"{self.capacity_bytes / 2**20:.1f} MiB, more than max_bytes={max_bytes / 2**20:.1f} MiB; "
                f"lower the clients per round (or per shard) or use a streaming strategy (fedavg family)"
            )
        self.updates: list[dict[str, torch.Tensor]] = []
        self.weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self.updates)

    @property
    def total_weight(self) -> float:
        return float(sum(self.weights))

    @property
    def nbytes(self) -> int:
        return self.count * self.model_bytes

    def _room(self, n: int) -> None:
        if self.count + n > self.max_clients:
            raise BufferFullError(
                f"update buffer is full: it holds max_clients={self.max_clients} updates "
                f"({self.capacity_bytes / 2**20:.1f} MiB) and {n} more arrived; robust aggregation keeps "
                f"every update, so raise max_clients to the clients per round (or per shard)"
            )

    def add(self, update: Params, weight: float) -> None:
        """Keep a float32 copy of one update (the caller's tensors are not kept or changed).

        Raises:
            ValueError: tensor names or shapes differ from the template, or weight <= 0.
            BufferFullError: max_clients updates are already held.
        """
        _check_update(update, self._shapes, weight)
        self._room(1)
        self.updates.append({k: x.detach().to(torch.float32, copy=True).contiguous() for k, x in update.items()})
        self.weights.append(float(weight))

    def merge(self, other: "BufferedUpdates") -> None:
        """Take over another buffer's updates (e.g. another shard's).

        Raises:
            ValueError: the other buffer has other tensors.
            BufferFullError: the merged count would pass max_clients.
        """
        if other._shapes != self._shapes:
            raise ValueError("cannot merge update buffers of different models")
        self._room(other.count)
        self.updates.extend(other.updates)
        self.weights.extend(other.weights)

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean (float64 accumulation) as float32 tensors.

        Raises:
            ValueError: nothing was added.
        """
        self._nonempty()
        w = torch.tensor(self.weights, dtype=torch.float64)
        return self._reduce(lambda x: (w @ x.to(torch.float64)) / w.sum())

    def _nonempty(self) -> None:
        if self.count == 0:
            raise ValueError("no updates were aggregated")

    def _chunks(self, k: str):
        """(start, stop, n x chunk float32 stack) over the flattened coordinates of tensor k."""
        numel = math.prod(self._shapes[k])
        step = max(1024, _WORK_BYTES // (16 * self.count))
        flat = [u[k].reshape(-1) for u in self.updates]
        for s in range(0, numel, step):
            e = min(s + step, numel)
            yield s, e, torch.stack([f[s:e] for f in flat])

    def _reduce(self, fn) -> dict[str, torch.Tensor]:
        """Apply `fn` (n x chunk -> chunk) over every coordinate, chunk by chunk."""
        out = {}
        for k, shape in self._shapes.items():
            flat = torch.empty(math.prod(shape), dtype=torch.float32)
            for s, e, x in self._chunks(k):
                flat[s:e] = fn(x).to(torch.float32)
            out[k] = flat.reshape(shape)
        return out


Collector = Union[RunningWeightedSum, BufferedUpdates]


def clip_update(update: Params, max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale an update so that its global L2 norm (over all tensors) is at most `max_norm`.

    Returns (clipped, scale) with scale = min(1, max_norm / norm) (1.0 for a zero update); the
    input is not changed. The norm is computed in float64; after the cast back the clipped norm
    can exceed max_norm by float32 rounding only (relative 1e-6).

    Raises:
        ValueError: max_norm is not a finite number > 0, or the update has a non-finite norm.
    """
    if isinstance(max_norm, bool) or not (isinstance(max_norm, (int, float)) and 0 < max_norm < math.inf):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    sq = sum(float(torch.sum(x.to(torch.float64) ** 2)) for x in update.values())
    norm = math.sqrt(sq)
    if not math.isfinite(norm):
        raise ValueError("update has a non-finite norm (NaN or inf values); it cannot be clipped")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    if scale == 1.0:
        return {k: x.clone() for k, x in update.items()}, 1.0
    return {k: (x.to(torch.float64) * scale).to(x.dtype) for k, x in update.items()}, scale


# -- reducers: collector -> one aggregated delta ------------------------------------------------

class Reducer(Protocol):
    """Turns the round's collected updates into one delta (float32 tensors)."""

    buffered: bool  # True: needs a BufferedUpdates (every update), False: a RunningWeightedSum

    def reduce(self, agg: Collector) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class WeightedMean:
    """sum_i w_i x_i / sum_i w_i: FedAvg's aggregate; streams."""

    buffered = False

    def reduce(self, agg: Collector) -> dict[str, torch.Tensor]:
        return agg.mean()


def _buffer(agg: Collector, who: str) -> BufferedUpdates:
    if not isinstance(agg, BufferedUpdates):
        raise TypeError(f"{who} needs every update: collect the round with BufferedUpdates, "
                        f"not {type(agg).__name__}")
    agg._nonempty()
    return agg


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median (Yin et al. 2018), unweighted; the mean of the two middle values for
    an even count (as numpy.median). Client weights are ignored: a client claiming a large weight
    must not be able to move a robust statistic."""

    buffered = True

    def reduce(self, agg: Collector) -> dict[str, torch.Tensor]:
        buf = _buffer(agg, "the coordinate-wise median")
        n = buf.count
        lo, hi = (n - 1) // 2, n // 2

        def med(x: torch.Tensor) -> torch.Tensor:
            s = torch.sort(x, dim=0).values
            return (s[lo].to(torch.float64) + s[hi].to(torch.float64)) / 2

        return buf._reduce(med)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018), unweighted: per coordinate drop the
    floor(trim_ratio * n) smallest and as many largest values, average the rest."""

    trim_ratio: float = 0.1
    buffered = True

    def __post_init__(self) -> None:
        if isinstance(self.trim_ratio, bool) or not (isinstance(self.trim_ratio, (int, float))
                                                     and 0 <= self.trim_ratio < 0.5):
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {self.trim_ratio!r}")

    def reduce(self, agg: Collector) -> dict[str, torch.Tensor]:
        buf = _buffer(agg, "the trimmed mean")
        n = buf.count
        k = int(math.floor(self.trim_ratio * n))
        return buf._reduce(lambda x: torch.sort(x, dim=0).values[k:n - k].to(torch.float64).mean(dim=0))


@dataclass(frozen=True)
class Krum:
    """(Multi-)Krum (Blanchard et al. 2017): score each update by the summed squared distance to its
    n - f - 2 nearest others, keep the `m` lowest-scoring updates, average them (unweighted).
    Tolerates f Byzantine clients when n > 2f + 2."""

    f: int = 0
    m: int = 1
    buffered = True

    def __post_init__(self) -> None:
        for name in ("f", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "f" else 1):
                raise ValueError(f"krum {name} must be an integer >= {0 if name == 'f' else 1}, got {v!r}")

    def select(self, agg: Collector) -> list[int]:
        """Indices (into agg.updates) of the selected updates, best first.

        Raises:
            ValueError: fewer than 2f + 3 updates (or fewer than m).
        """
        buf = _buffer(agg, "Krum")
        n = buf.count
        if n < 2 * self.f + 3 or n < self.m:
            raise ValueError(f"Krum with f={self.f}, m={self.m} needs at least {max(2 * self.f + 3, self.m)} "
                             f"updates, got {n}; lower strategy.krum_f or sample more clients")
        gram = torch.zeros(n, n, dtype=torch.float64)
        for k in buf._shapes:
            for _, _, x in buf._chunks(k):
                x = x.to(torch.float64)
                gram += x @ x.T
        sq = torch.diagonal(gram)
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        dist.fill_diagonal_(math.inf)
        nearest = torch.sort(dist, dim=1).values[:, : n - self.f - 2]
        scores = nearest.sum(dim=1)
        # Stable on ties: the lower index wins, so the same updates give the same choice.
        order = sorted(range(n), key=lambda i: (float(scores[i]), i))
        return order[: self.m]

    def reduce(self, agg: Collector) -> dict[str, torch.Tensor]:
        chosen = self.select(agg)
        ups = agg.updates
        return {k: torch.stack([ups[i][k].to(torch.float64) for i in chosen]).mean(dim=0).to(torch.float32)
                for k in agg._shapes}


def __getattr__(name: str):
    # FedAvg moved to strategy.py (which imports this module); resolved lazily to avoid an import
    # cycle, so `from fedray.orchestrator.aggregation import FedAvg` keeps working.
    if name == "FedAvg":
        from .strategy import FedAvg

        return FedAvg
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
