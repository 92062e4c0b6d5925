"""A population of up to billions of virtual clients with nothing stored per client, and the
round sampler that turns device heterogeneity into virtual time.

Every client has a compute speed, an upload and a download bandwidth and a probability of being
online in a round. None of it is stored: each property is derived on demand from (seed, client
id) by a counter-based hash (SplitMix64 at position `id` of a stream keyed by the seed and the
property), so a population of 1,000,000,000 clients costs the same few hundred bytes as one of
ten, and only the clients a round looks at are ever materialized. Speeds and bandwidths are
lognormal (Box-Muller on two hashed uniforms), the online probability Beta (its inverse CDF on a
hashed uniform), or the rows of a trace file (client k takes row k % rows).

`Population.sample_round` follows FedScale's over-commitment: it walks a seeded pseudo-random
permutation of all client ids (a Feistel network with cycle walking, keyed by (seed, round)),
keeps the first ceil(k * over_select) ids online this round, gives each a virtual completion
time (compute on its own examples at its own speed, plus the real compressed bytes over its own
links), and returns the first k finishers (only those inside the deadline, if there is one). The
walk costs O(candidates / availability), whatever the population size. The round's virtual time
is when the last kept update arrives, or the deadline when fewer than k made it.

`SeededPartition` gives any number of clients their examples of a small data set (with reuse):
client k's size and examples come from a hash of (seed, k); memory is two arrays of the data
set's size.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedray.config import DeviceProfileSpec

__all__ = [
    "DeviceProfileSpec",
    "Population",
    "PopulationError",
    "RoundSample",
    "SeededPartition",
    "completion_times",
    "permute",
]


class PopulationError(ValueError):
    """A population, profile or trace that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class RoundSample:
    """One round's selection. `train_ids` are the clients to train (the first k finishers, in
    finishing order); `finish_s` their virtual completion times. `virtual_s` is the round's
    virtual duration. `online` is the number of clients online this round: exact when the walk
    covered the whole population (a small one), else its expectation (population size times the
    mean online probability), which is what a billion-client round can know without looking at
    every client."""

    round: int
    train_ids: np.ndarray  # int64
    finish_s: np.ndarray  # float64, same order as train_ids
    virtual_s: float
    selected: int  # over-selected candidates
    online: int  # clients online this round (see above)
    missed_deadline: int  # candidates that would have finished after the deadline
    extra: dict = field(default_factory=dict)


def completion_times(
    examples: np.ndarray, speed: np.ndarray, up_mbps: np.ndarray, down_mbps: np.ndarray, *,
    epochs: int, seconds_per_example: float, bytes_up: float | np.ndarray, bytes_down: float | np.ndarray,
) -> np.ndarray:
    """Virtual seconds for each client: download, `epochs` passes over its examples, upload."""
    compute = epochs * examples.astype(np.float64) * seconds_per_example / speed
    down = np.asarray(bytes_down, dtype=np.float64) * 8.0 / (down_mbps.astype(np.float64) * 1e6)
    up = np.asarray(bytes_up, dtype=np.float64) * 8.0 / (up_mbps.astype(np.float64) * 1e6)
    return compute + down + up


# Counter-based hashing. SplitMix64's output at position i of the stream with state `key` is
# mix(key + (i + 1) * GAMMA); the same function on Python ints (one client) and on uint64 arrays
# (a cohort). numpy's uint64 array arithmetic wraps modulo 2**64, which is what the hash needs.
_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U = np.uint64


def _splitmix64(x: int) -> int:
    x = (x + _GAMMA) & _M64
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return x ^ (x >> 31)


def _stream(seed: int, *tags: int) -> int:
    """The key of one hash stream: (seed, tags...) folded through SplitMix64."""
    k = _splitmix64(int(seed) & _M64)
    for t in tags:
        k = _splitmix64(k ^ (int(t) & _M64))
    return k


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array (a fresh array; `z` is left alone)."""
    z = z ^ (z >> _U(30))
    z *= _U(_C1)
    z ^= z >> _U(27)
    z *= _U(_C2)
    z ^= z >> _U(31)
    return z


def _hash(key: int, ids: np.ndarray) -> np.ndarray:
    """uint64 hash of every id in the stream `key`: equal to `_splitmix64((key + id * GAMMA) % 2**64)`."""
    z = np.asarray(ids).astype(np.uint64)
    z *= _U(_GAMMA)
    z += _U((key + _GAMMA) & _M64)
    return _mix(z)


def _uniform(key: int, ids: np.ndarray) -> np.ndarray:
    """float64 in (0, 1], 53 bits, one per id."""
    return ((_hash(key, ids) >> _U(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))


def _normal(key: int, ids: np.ndarray) -> np.ndarray:
    """Standard normal per id, Box-Muller on two uniforms of the stream's two sub-streams."""
    u1, u2 = _uniform(_splitmix64(key ^ 1), ids), _uniform(_splitmix64(key ^ 2), ids)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _feistel(x: np.ndarray, keys: tuple[int, ...], half: int) -> np.ndarray:
    mask = _U((1 << half) - 1)
    left, right = x >> _U(half), x & mask
    for k in keys:
        left, right = right, left ^ (_hash(k, right) & mask)
    return (left << _U(half)) | right


def permute(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """Position -> id under a keyed pseudo-random permutation of [0, n): a 6-round balanced
    Feistel network on the smallest even number of bits covering n, with cycle walking (values
    outside [0, n) are permuted again until they land inside; at most 4x the domain, so about
    two passes on average). Distinct positions give distinct ids; O(len(positions)).
    """
    bits = max(2, (int(n) - 1).bit_length())
    bits += bits & 1
    keys = tuple(_splitmix64(key ^ (0xFE15 + i)) for i in range(6))
    y = _feistel(np.asarray(positions, dtype=np.uint64), keys, bits // 2)
    out = y >= _U(n)
    # Every cycle through an id inside [0, n) comes back inside: the walk ends. Bounded anyway.
    for _ in range(1 << min(bits, 40)):
        if not out.any():
            break
        y[out] = _feistel(y[out], keys, bits // 2)
        out = y >= _U(n)
    return y.astype(np.int64)


# Stream tags of the per-client properties.
_SPEED, _UP, _DOWN, _AVAIL, _ONLINE, _WALK, _SIZE = 0x5EED, 0x0B, 0xD0, 0xA7, 0x0411, 0x5E1, 0x517E


class Population:
    """`num_clients` virtual clients whose device profiles are derived from (seed, id) on demand.

    `examples` is one count per client (an array) or a function from an id array to counts
    (e.g. `SeededPartition.sizes_of`, which stores nothing per client).

    Raises:
        PopulationError: num_clients < 1, a bad profile, or a trace file that cannot be read.
    """

    def __init__(self, num_clients: int, seed: int, *, profile: DeviceProfileSpec = DeviceProfileSpec(),
                 examples: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if num_clients < 1:
            raise PopulationError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients, self.seed, self.profile = int(num_clients), int(seed), profile
        self._trace = _from_trace(profile.trace_file) if profile.trace_file else None
        if examples is not None and not callable(examples):
            examples = np.asarray(examples)
            if examples.shape != (num_clients,):
                raise PopulationError(f"examples must have one count per client ({num_clients}), got shape {examples.shape}")
        self.examples = examples
        p = profile
        self._beta = None
        if self._trace is None and p.availability < 1.0 and p.availability_concentration is not None:
            a = p.availability * p.availability_concentration
            self._beta = (a, p.availability_concentration - a)
        self._always_online = (self._trace is None and p.availability >= 1.0) or (
            self._trace is not None and bool((self._trace[3] >= 1.0).all()))

    def memory_bytes(self) -> int:
        """Bytes held: the trace rows and a per-client examples array if one was given; nothing per
        client otherwise."""
        held = list(self._trace) if self._trace is not None else []
        if isinstance(self.examples, np.ndarray):
            held.append(self.examples)
        return sum(a.nbytes for a in held)

    def profiles(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(speed, up_mbps, down_mbps, online probability) of the clients `ids`, float32 each."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._trace is not None:
            row = ids % len(self._trace[0])
            return tuple(a[row] for a in self._trace)  # type: ignore[return-value]
        p, s = self.profile, self.seed

        def lognormal(tag: int, median: float, sigma: float) -> np.ndarray:
            return (median * np.exp(sigma * _normal(_stream(s, tag), ids))).astype(np.float32)

        speed = lognormal(_SPEED, p.speed_median, p.speed_sigma)
        up = lognormal(_UP, p.up_mbps_median, p.up_sigma)
        down = lognormal(_DOWN, p.down_mbps_median, p.down_sigma)
        return speed, up, down, self._availability(ids)

    def _availability(self, ids: np.ndarray) -> np.ndarray:
        if self._trace is not None:
            return self._trace[3][ids % len(self._trace[3])]
        if self._beta is None:
            return np.full(len(ids), self.profile.availability, dtype=np.float32)
        from scipy.special import betaincinv

        u = _uniform(_stream(self.seed, _AVAIL), ids)
        return betaincinv(self._beta[0], self._beta[1], np.minimum(u, 1.0 - 2**-53)).astype(np.float32)

    def is_online(self, round: int, ids: np.ndarray) -> np.ndarray:
        """Whether each client of `ids` is online in `round` (a hashed uniform of (seed, round, id)
        below the client's online probability)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._always_online:
            return np.ones(len(ids), dtype=bool)
        u = _uniform(_stream(self.seed, _ONLINE, round), ids)
        return u <= self._availability(ids)  # u in (0, 1]: probability 0 is never online

    def online(self, round: int) -> np.ndarray:
        """Ids of every client online in `round`: O(num_clients), for small populations and tests;
        rounds never call it."""
        ids = np.arange(self.num_clients, dtype=np.int64)
        return ids if self._always_online else ids[self.is_online(round, ids)]

    def expected_online(self) -> int:
        """The expected number of clients online in a round."""
        if self._trace is None:
            return int(round(self.num_clients * self.profile.availability))
        rows = len(self._trace[3])
        per_row = np.full(rows, self.num_clients // rows, dtype=np.float64)
        per_row[: self.num_clients % rows] += 1
        return int(round(float(per_row @ self._trace[3].astype(np.float64))))

    def candidates(self, round: int, m: int) -> tuple[np.ndarray, int | None]:
        """The first `m` clients online in `round` along the round's permutation of all ids, and
        the exact number online when the walk covered the whole population (else None; then
        fewer than `m` may come back only if fewer are online). Work is O(m / availability)
        hashes, in chunks, whatever the population size."""
        n, key = self.num_clients, _stream(self.seed, _WALK, round)
        if self._always_online:
            return permute(np.arange(min(m, n), dtype=np.uint64), n, key), n
        rate = max(self.expected_online() / n, 1e-3)
        found: list[np.ndarray] = []
        have = pos = seen = 0
        while have < m and pos < n:  # each pass advances pos by >= 256: at most n / 256 passes
            size = min(n - pos, max(256, math.ceil((m - have) / rate * 1.1)))
            ids = permute(np.arange(pos, pos + size, dtype=np.uint64), n, key)
            ids = ids[self.is_online(round, ids)]
            seen += len(ids)
            found.append(ids[: m - have])
            have += len(found[-1])
            pos += size
        out = np.concatenate(found) if found else np.zeros(0, np.int64)
        return out, (seen if pos >= n else None)

    def sample_round(
        self, round: int, k: int, *, over_select: float = 1.3, deadline_s: float | None = None,
        bytes_up: float = 0.0, bytes_down: float = 0.0, epochs: int = 1,
        examples: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> RoundSample:
        """Select round `round`'s clients (seeded by (seed, round) alone).

        Over-selects ceil(k * over_select) online clients, keeps the first k finishers in virtual
        time, and with `deadline_s` only those finishing by it. `bytes_up`/`bytes_down` are the
        real encoded sizes of one update and of the broadcast model. `examples` (one count per
        client, or a function of an id array) overrides the counts given at construction; without
        either, every client counts one example.

        Raises:
            PopulationError: k < 1, over_select < 1, or a non-positive deadline.
        """
        if k < 1:
            raise PopulationError(f"k must be >= 1, got {k}")
        if not over_select >= 1.0:
            raise PopulationError(f"over_select must be >= 1.0, got {over_select}")
        if deadline_s is not None and not deadline_s > 0:
            raise PopulationError(f"deadline_s must be > 0, got {deadline_s}")
        cand, exact = self.candidates(round, math.ceil(k * over_select))
        online = exact if exact is not None else self.expected_online()
        ex_all = examples if examples is not None else self.examples
        if ex_all is None:
            ex = np.ones(len(cand), dtype=np.int64)
        else:
            ex = np.asarray(ex_all(cand) if callable(ex_all) else ex_all[cand])
        speed, up, down, _ = self.profiles(cand)
        t = completion_times(ex, speed, up, down, epochs=epochs, seconds_per_example=self.profile.seconds_per_example,
                             bytes_up=bytes_up, bytes_down=bytes_down)
        order = np.argsort(t, kind="stable")[:k]
        missed = 0
        if deadline_s is not None:
            in_time = t[order] <= deadline_s
            missed = int((t > deadline_s).sum())
            order = order[in_time]
        finish = t[order]
        if deadline_s is not None and len(order) < k:
            virtual = float(deadline_s)  # the server waited for the deadline
        else:
            virtual = float(finish[-1]) if len(finish) else 0.0
        return RoundSample(round, cand[order].astype(np.int64), finish, virtual, len(cand), online, missed)


def _from_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows of `path` ordered by client_id: (speed, up_mbps, down_mbps, availability).
    Client k takes row k % rows (a small trace covers a large population)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise PopulationError(f"cannot read device trace {path}: {e}") from e
    need = ("client_id", "speed", "up_mbps", "down_mbps")
    if not rows or any(c not in rows[0] for c in need):
        raise PopulationError(f"device trace {path} needs a header with columns {', '.join(need)}[,availability]")
    try:
        ids = np.array([int(r["client_id"]) for r in rows])
        cols = {c: np.array([float(r[c]) for r in rows], dtype=np.float32) for c in need[1:]}
        av = np.array([float(r.get("availability") or 1.0) for r in rows], dtype=np.float32)
    except ValueError as e:
        raise PopulationError(f"device trace {path}: {e}") from e
    if sorted(ids.tolist()) != list(range(len(ids))):
        raise PopulationError(f"device trace {path}: client_id must be 0..{len(ids) - 1}, each once")
    if (cols["speed"] <= 0).any() or (cols["up_mbps"] <= 0).any() or (cols["down_mbps"] <= 0).any():
        raise PopulationError(f"device trace {path}: speed and bandwidths must be > 0")
    if ((av < 0) | (av > 1)).any():
        raise PopulationError(f"device trace {path}: availability must be within [0, 1]")
    order = np.argsort(ids)
    return tuple(np.ascontiguousarray(a[order]) for a in (cols["speed"], cols["up_mbps"], cols["down_mbps"], av))


class SeededPartition:
    """`num_clients` clients over `num_examples` examples with reuse: client k holds `size(k)`
    distinct examples, derived on demand from (seed, k). Same interface as
    `fedray.workers.data.Partition` (`client`, `sizes`, `num_clients`) plus `sizes_of(ids)`;
    memory is two arrays of the data set's size, whatever the number of clients.

    Client k takes `order[(start + j * stride) % num_examples]` for j < size(k), where `order` is
    one seeded shuffle of the data set and (start, stride) come from a hash of (seed, k), stride
    coprime to num_examples so that the examples are distinct. `examples_per_client` is a fixed
    count, or (low, high) for sizes uniform in [low, high] (from another hash of (seed, k)).

    Raises:
        PopulationError: a size outside [1, num_examples], or num_clients < 1.
    """

    def __init__(self, num_examples: int, num_clients: int, *, examples_per_client: int | tuple[int, int] = 16,
                 seed: int = 0) -> None:
        lo, hi = (examples_per_client, examples_per_client) if isinstance(examples_per_client, int) else examples_per_client
        if not 1 <= lo <= hi <= num_examples:
            raise PopulationError(f"examples_per_client must be within [1, {num_examples}], got {examples_per_client}")
        if num_clients < 1:
            raise PopulationError(f"num_clients must be >= 1, got {num_clients}")
        n = self.num_examples = int(num_examples)
        self.seed, self._n_clients, self._lo, self._hi = int(seed), int(num_clients), int(lo), int(hi)
        rng = np.random.default_rng([seed, 0x517E])
        self._order = rng.permutation(n).astype(np.int64)
        units = np.arange(1, max(n, 2), dtype=np.int64)
        self._strides = units[np.gcd(units, n) == 1] if n > 1 else np.ones(1, dtype=np.int64)
        self._key = _stream(self.seed, 0xC11E)  # start and stride
        self._size_key = _stream(self.seed, _SIZE)

    @property
    def num_clients(self) -> int:
        return self._n_clients

    def sizes_of(self, ids: np.ndarray) -> np.ndarray:
        """Example counts of the clients `ids` (int64), O(len(ids))."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._lo == self._hi:
            return np.full(len(ids), self._lo, dtype=np.int64)
        span = _U(self._hi - self._lo + 1)
        return (_hash(self._size_key, ids) % span).astype(np.int64) + self._lo

    def sizes(self) -> np.ndarray:
        """Every client's example count: O(num_clients) memory, for small populations; rounds use
        `sizes_of`."""
        return self.sizes_of(np.arange(self._n_clients, dtype=np.int64))

    def client(self, k: int) -> np.ndarray:
        k = int(k)
        if not 0 <= k < self._n_clients:
            raise IndexError(f"client {k} is outside [0, {self._n_clients})")
        h = _splitmix64((self._key + k * _GAMMA) & _M64)
        start, stride = h % self.num_examples, int(self._strides[(h >> 32) % len(self._strides)])
        size = self._lo if self._lo == self._hi else int(self.sizes_of(np.array([k]))[0])
        j = np.arange(size, dtype=np.int64)
        return self._order[(start + j * stride) % self.num_examples]

    def memory_bytes(self) -> int:
        return self._order.nbytes + self._strides.nbytes
