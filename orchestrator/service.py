"""The aggregation service: a plain handler (`AggregationCore`) and its gRPC server.

An upload is checked (token, job, round, tensor list against the model), each tensor is
validated and decoded as soon as its bytes are complete, and the update is committed to the
running sum only at the end of the stream: a stream that breaks, or any malformed tensor, leaves
the aggregate untouched.

Bytes: a tensor that lies inside one ~1 MB chunk is read where gRPC put it (zero-copy); one that
spans chunks is copied once into a buffer of its declared (capped) size. Decoding: for plain
FedAvg-family jobs (no clipping, privacy, dropout or weights uploads) each tensor becomes a
`Codec.fold`, which int8 and identity run straight from their bytes into the float64 sum at
commit; otherwise tensors are decoded into staging buffers reused across uploads (no fresh
allocation per upload).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import grpc
import numpy as np
import torch

from fedray.compression import PayloadError, decode_checked, get_codec
from fedray.compression.accumulate import ADD_BLOCK, load_fold_kernels_soon
from fedray.compression.codec import Codec, UnknownCodecError
from fedray.compression.payload import Payload
from fedray.proto import serde
from fedray.proto.aggregate import CLIENTS_METRIC, is_aggregate_id
from fedray.proto.auth import token_expiry, verify_token
from fedray.proto.health import StandardHealth, add_standard_health

from fedray.compression.fd import CountedSum, SubnetSpec, keep_rate_for
from fedray.config import ServiceLimits
from fedray.workers.broadcast import Broadcast, decode_broadcast
from fedray.workers.client import client_seed

from .aggregation import RunningWeightedSum, clip_update
from .heap import keep_freed_buffers
from .privacy import DPSpec
from .strategy import StrategySpec
from .streams import StreamWatchdog

__all__ = [
    "AggregationCore",
    "AuthError",
    "DuplicateUpdateError",
    "OverloadedError",
    "RoundClosedError",
    "RoundNotOpenYetError",
    "ServiceLimits",
    "WrongJobError",
    "create_server",
    "status_of",
]


class ServiceError(Exception):
    """Base of the service's domain errors."""


class AuthError(ServiceError):
    """Missing or invalid token."""


class WrongJobError(ServiceError):
    """The request names another job."""


class RoundClosedError(ServiceError):
    """The request is for a round that is not open (stale, replayed or not started)."""


class RoundNotOpenYetError(ServiceError):
    """The upload is for the next round, which the driver has not opened yet (it opens rounds
    without waiting for the shards' answer): retry shortly (UNAVAILABLE, with a retry hint)."""

    retry_after_ms = 100


class WrongShardError(ServiceError):
    """The client belongs to another shard (clients map to shards by a hash of their id)."""


class DuplicateUpdateError(ServiceError):
    """This (round, client) update was already committed."""


class OverloadedError(ServiceError):
    """Too many uploads in flight; retry after a back-off (sent as the grpc-retry-pushback-ms and
    retry-after-ms trailers)."""

    def __init__(self, msg: str, retry_after_ms: int = 50) -> None:
        super().__init__(msg)
        self.retry_after_ms = retry_after_ms


# The one place where domain errors become gRPC status codes.
_STATUS = (
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (WrongJobError, grpc.StatusCode.PERMISSION_DENIED),
    (DuplicateUpdateError, grpc.StatusCode.ALREADY_EXISTS),
    (RoundClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (RoundNotOpenYetError, grpc.StatusCode.UNAVAILABLE),
    (WrongShardError, grpc.StatusCode.FAILED_PRECONDITION),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PayloadError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_of(e: Exception) -> grpc.StatusCode | None:
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return code
    return None


def _q(x: object, n: int = 64) -> str:
    """`repr(x)` cut to about `n` characters: error messages quote client input only this short."""
    if isinstance(x, (str, bytes, list, tuple)) and len(x) > n:  # never repr a megabyte to cut it
        return f"{x[: n - 16]!r}...({len(x)} long)"
    r = repr(x)
    return r if len(r) <= n else f"{r[: n - 12]}...({len(r)} chars)"


@dataclass
class _RoundState:
    round: int
    agg: object  # the strategy's collector (RunningWeightedSum, BufferedUpdates) or a CountedSum (dropout)
    broadcast: Broadcast | None
    committed: set[int]
    start: dict | None = None  # the decoded broadcast, for uploads of weights (OMC)
    bytes_received: int = 0
    decode_s: float = 0.0
    represented: int = 0  # clients beyond one that the committed partial sums stand for (worker_reduce)
    # Streaming sums are striped: up to `max_active` commits add into their own partial sum at
    # once (the adds release the GIL), merged into `agg` at close. A buffered collector is one stripe.
    stripes: "queue.SimpleQueue | None" = None
    parts: tuple = ()
    pending: set[int] = field(default_factory=set)  # clients whose commit is adding right now
    folds: list = field(default_factory=list)  # folded updates waiting for a stripe (_commit_folds)
    closing: bool = False  # close_round is waiting for `pending` to drain


class _Turns:
    """At most `n` threads inside at once; a C-level queue of tokens (a threading.Semaphore is
    a Python Condition: ~10 us an acquire, paid several times per upload)."""

    def __init__(self, n: int) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n):
            self._q.put(None)

    def __enter__(self) -> None:
        self._q.get()

    def __exit__(self, *exc) -> None:
        self._q.put(None)


class _ScratchPool:
    """Float32 staging buffers by element count, reused across uploads: decoding into a warm
    buffer skips the first-touch page faults of a fresh one (about 10 ms per 128 MiB here).
    Idle buffers kept: at most `keep` per size and `budget` bytes per size (at least one)."""

    def __init__(self, keep: int, budget: int = 256 << 20) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._keep, self._budget = keep, budget
        self._lock = threading.Lock()

    def take(self, numel: int, held: list) -> torch.Tensor:
        with self._lock:
            free = self._free.get(numel)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.from_numpy(np.empty(numel, np.float32))  # numpy memory: huge pages
        held.append(buf)
        return buf

    def give_back(self, held: list) -> None:
        with self._lock:
            for buf in held:
                free = self._free.setdefault(buf.numel(), [])
                if len(free) < max(1, min(self._keep, self._budget // max(1, 4 * buf.numel()))):
                    free.append(buf)
        held.clear()


class AggregationCore:
    """The service's logic, callable in-process (tests) or behind gRPC (`create_server`)."""

    def __init__(
        self, *, job_id: str, secret: str, shapes: Mapping[str, tuple[int, ...]],
        limits: ServiceLimits = ServiceLimits(), spec_json: str = "{}", num_rounds: int = 0,
        shard: tuple[int, int] = (0, 1), strategy: StrategySpec = StrategySpec(), privacy: DPSpec | None = None,
        max_clients: int = 1 << 16, codecs: Mapping[str, Mapping] | None = None, dropout=None, layout=None,
        seed: int = 0, max_weight: float | None = None, worker_reduce: bool = False,
    ) -> None:
        self.job_id = job_id
        self._worker_reduce = worker_reduce  # resources.worker_reduce: workers' partial sums are accepted
        self._max_weight = max_weight  # StrategySpec.weight_cap: declared weights above it count as it
        self._codec_params = {k: dict(v) for k, v in (codecs or {}).items()}
        self._dropout = dropout  # DropoutSpec: uploads are sub-models, averaged per coordinate
        self._layout = layout
        self._seed = seed
        if dropout is not None:
            self._keep = dropout  # a DropoutSpec is a KeepRateConfig
        self._strategy = strategy.build()
        self._privacy = privacy
        self._max_clients = max_clients
        self._shard = shard
        self._addresses: tuple[str, ...] = ()
        self._spec_json = spec_json
        self._num_rounds = num_rounds
        self._last_round = 0
        self._finished = False
        self._finish_listeners: list[Callable[[], None]] = []
        self._open_wait_s = 5.0  # the gap between a round's open and its first upload is milliseconds
        self._close_wait_s = 300.0  # close_round(expect=...) gives up waiting after this: the driver closes
        self._awaited: tuple[int, int] | None = None  # (round, updates) a close_round(expect=...) waits for
        self._last_closed: tuple[int, set[int]] | None = None  # the last closed round and who committed in it
        self._secret = secret
        self._verified: dict[tuple[int, str], int] = {}  # (client, token) -> expiry, of tokens verified
        self._shapes = {k: tuple(v) for k, v in shapes.items()}
        self._limits = limits
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # close_round waits here for commits in progress
        self._state: _RoundState | None = None
        self._inflight = 0
        self._per_client: dict[tuple[str, int], int] = {}  # ("up" or "down", client) -> calls open
        self._committed_total = 0
        self._bytes_total = 0
        self._codecs: dict[tuple[str, tuple], Codec] = {}
        self._folders: dict[bytes, object] = {}
        self._scratch = _ScratchPool(keep=limits.max_inflight)
        self._active = _Turns(limits.active)
        # Plain FedAvg family: tensors fold straight into the running sum (module docstring).
        self._folds = (dropout is None and privacy is None and getattr(self._strategy, "folds_raw_updates", False))
        largest = max((math.prod(s) for s in self._shapes.values()), default=0)
        if self._folds and (largest > ADD_BLOCK or os.environ.get("FEDRAY_FOLD_NUMBA") == "always"):
            # tensors over ADD_BLOCK values add in fused passes (fold_kernels), loaded while the
            # server starts; a model without one never uses them, nor pays their loading (~0.7 s
            # of CPU beside its first rounds, ~120 MB). FEDRAY_FOLD_NUMBA=always loads them anyway.
            load_fold_kernels_soon()

    @property
    def limits(self) -> ServiceLimits:
        return self._limits

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    # -- round control (driver side) ------------------------------------------------------------

    def _collector(self):
        if self._dropout is not None:
            return CountedSum(self._shapes)
        return self._strategy.new_collector(self._shapes, max_clients=self._max_clients)

    def open_round(self, round: int, broadcast: Broadcast | None = None) -> None:
        agg = self._collector()
        parts = [agg]
        if isinstance(agg, (RunningWeightedSum, CountedSum)):
            numel = sum(math.prod(s) for s in self._shapes.values())
            per = numel * (16 if isinstance(agg, CountedSum) else 8)
            # striping costs a float64 sum per stripe: at most 4, and 1 GiB of them
            parts += [self._collector() for _ in range(min(self._limits.active, 4, max(1, (1 << 30) // max(per, 1))) - 1)]
        stripes: queue.SimpleQueue = queue.SimpleQueue()
        for part in parts:
            stripes.put(part)
        with self._cond:
            self._state = _RoundState(round, agg, broadcast, set(), stripes=stripes, parts=tuple(parts))
            self._last_round = round
            self._cond.notify_all()  # uploads that arrived before the open (upload)

    def set_addresses(self, addresses: tuple[str, ...]) -> None:
        """Every shard's address, for GetJob (known only once all shards have started)."""
        self._addresses = tuple(addresses)

    def committed(self, round: int) -> int:
        """Updates committed so far in `round` (0 if it is not the open round)."""
        st = self._state
        return len(st.committed) + st.represented if st is not None and st.round == round else 0

    def finish(self) -> None:
        """Mark the job finished: real clients polling GetJob stop."""
        with self._cond:
            self._finished = True
            self._state = None
            self._cond.notify_all()
            listeners, self._finish_listeners = self._finish_listeners, []
        for fn in listeners:
            fn()

    def on_finish(self, fn: Callable[[], None]) -> None:
        """Call `fn` once when the job finishes (now, if it has): the standard health check's
        NOT_SERVING follows the job's end as fedray's own Health does."""
        with self._cond:
            if not self._finished:
                self._finish_listeners.append(fn)
                return
        fn()

    def close_round(self, round: int, expect: int | None = None) -> dict | None:
        """Close the round; return its collector (`agg`: a partial sum, or the buffered updates of
        a robust strategy) and counters.

        With `expect`, the driver sends the close right after dispatching the round (no round trip
        after the workers' results): it waits until round `round` is open here and `expect`
        updates are committed in it (`committed`), then closes. It returns None, closing nothing,
        when the round is closed meanwhile by a plain `close_round` (the driver's fallback when
        some clients failed), when a later round opens or the job finishes, or after
        `_close_wait_s`; the driver then closes the round itself."""
        with self._cond:
            if expect is not None:
                self._awaited = (round, expect)
                try:
                    self._cond.wait_for(lambda: self._close_ready(round, expect) is not None, timeout=self._close_wait_s)
                finally:
                    self._awaited = None
                if not self._close_ready(round, expect):
                    return None
            st = self._state
            if st is None or st.round != round:
                raise RoundClosedError(f"round {round} is not open")
            self._state = None
            self._last_closed = (round, st.committed)  # a retried upload of a committed update: ALREADY_EXISTS
            self._cond.notify_all()  # a close_round(expect=...) of this round stops waiting
            st.closing = True
            while st.pending:  # commits that checked in before the close finish their adds
                self._cond.wait()
        for part in st.parts[1:]:
            st.agg.merge(part)
        return {
            "agg": st.agg, "sums": getattr(st.agg, "sums", None), "total_weight": getattr(st.agg, "total_weight", None),
            "count": len(st.committed) + st.represented, "bytes_received": st.bytes_received, "decode_s": st.decode_s,
        }

    def _close_ready(self, round: int, expect: int) -> bool | None:
        """For close_round(expect=...), under the lock: True when round `round` is open with
        `expect` updates committed, False when it can no longer be (closed, a later round open,
        the job finished), None while it may still come."""
        if self._finished or self._last_round > round:
            return False
        st = self._state
        if self._last_round < round:  # not opened yet (the open may run after this call)
            return None
        if st is None or st.round != round:
            return False
        return True if len(st.committed) + st.represented >= expect else None

    def _wake_closer(self, st: _RoundState) -> None:
        """Under the lock, after a commit: wake a close_round(expect=...) whose count is reached."""
        aw = self._awaited
        if aw is not None and aw[0] == st.round and len(st.committed) + st.represented >= aw[1]:
            self._cond.notify_all()

    # -- RPC handlers ---------------------------------------------------------------------------

    def authenticate(self, job_id: str, client_id: int, token: str) -> None:
        """Check the token; the first thing done with any request, before anything else the client
        sent is parsed, converted or cached. The gRPC server calls it twice: with the call's
        metadata (`serde.credentials`) before the request's body is received, then with the job
        and client that the body names (an update or request for another client than the
        metadata's fails here).

        Raises:
            AuthError: no token, or one that is malformed, expired or not this client's.
            WrongJobError: the request names another job.
        """
        if not token:
            raise AuthError(f"no token: send the client's token in the {serde.TOKEN_METADATA_KEY} metadata")
        if job_id != self.job_id:
            raise WrongJobError(f"this service aggregates job {self.job_id!r}, not {_q(job_id)}")
        # An upload's token is checked three times (the call's metadata, the body's ids, the
        # core): a token verified once is its (client, token) pair and expiry here, so the
        # later checks compare and read the clock instead of computing the HMAC again.
        key = (client_id, token)
        exp = self._verified.get(key)
        if exp is not None and exp >= time.time():
            return
        if not verify_token(self._secret, job_id, client_id, token):
            raise AuthError(f"invalid or expired token for client {client_id} of job {self.job_id!r}")
        if len(self._verified) >= _MAX_VERIFIED:  # bounded: only valid tokens are kept
            self._verified.clear()
        self._verified[key] = token_expiry(token)

    _check_auth = authenticate

    def _codec(self, p: Payload) -> Codec:
        key = (p.codec, p.version)
        c = self._codecs.get(key)
        if c is None:
            # The job's own settings for its codecs (composite codecs check them); defaults otherwise.
            c = get_codec(p.codec, **self._codec_params.get(p.codec, {}))  # UnknownCodecError is a PayloadError
            if p.version != c.version:  # only what this build speaks is cached (a bounded set)
                raise PayloadError(f"{p.codec}: wire version {p.version} is not supported (this build speaks {c.version})")
            self._codecs[key] = c
        return c

    def _enter(self, kind: str, client_id: int) -> None:
        """Count one more open call of `client_id` (under the lock)."""
        key = (kind, client_id)
        n = self._per_client.get(key, 0)
        if n >= self._limits.max_inflight_per_client:
            raise OverloadedError(f"client {client_id} already has {n} {kind}load(s) open "
                                  f"(limit {self._limits.max_inflight_per_client}); retry after a back-off", 500)
        self._per_client[key] = n + 1

    def _leave(self, kind: str, client_id: int) -> None:
        key = (kind, client_id)
        n = self._per_client.pop(key, 1) - 1
        if n > 0:
            self._per_client[key] = n

    def _subnet(self, h: serde.UpdateHeader) -> SubnetSpec | None:
        """The client's subnet, regenerated here from (job seed, round, client): only the seed
        travels, and a header that claims another one is refused."""
        if self._dropout is None:
            return None
        seed = client_seed(self._seed, h.round, h.client_id)
        keep = keep_rate_for(h.client_id, h.round, self._keep, seed=self._seed)
        if h.subnet_seed != seed or abs(h.keep_rate - keep) > 1e-12:
            raise PayloadError(f"client {h.client_id}: subnet (seed {h.subnet_seed}, keep {h.keep_rate}) is not "
                               f"the one assigned for round {h.round}")
        return SubnetSpec(seed=seed, keep_rate=keep, policy=self._dropout.policy, round=h.round, client=h.client_id)

    def _check_shard(self, client_id: int) -> None:
        i, n = self._shard
        want = serde.shard_index(client_id, n)
        if want != i:
            where = f" at {self._addresses[want]}" if len(self._addresses) == n else ""
            raise WrongShardError(f"client {client_id} uploads to shard {want}{where}, not shard {i}")

    def _check_header(self, h: serde.UpdateHeader, sub: SubnetSpec | None) -> None:
        if len(h.tensors) > self._limits.max_tensors:
            raise PayloadError(f"{len(h.tensors)} tensors, over the limit of {self._limits.max_tensors}")
        names = [t.name for t in h.tensors]
        if sorted(names) != sorted(self._shapes) or len(set(names)) != len(names):
            raise PayloadError(f"update tensors {_q(names, 200)} do not match the model's {sorted(self._shapes)}")
        shapes = self._layout.sub_shapes(sub) if sub is not None else self._shapes
        for t in h.tensors:
            if t.payload.shape != shapes[t.name]:
                raise PayloadError(f"tensor {t.name!r}: shape {_q(t.payload.shape)} != expected {shapes[t.name]}")
            # what the codec can need for this shape, before a byte is buffered
            most = _max_wire_bytes(self._codec(t.payload), t.payload.shape)
            if t.nbytes > most:
                raise PayloadError(f"tensor {t.name!r}: declares {t.nbytes} bytes, but codec {t.payload.codec!r} "
                                   f"needs at most {most} for shape {t.payload.shape}")
        total = h.total_bytes
        if total > self._limits.max_update_bytes:
            raise PayloadError(f"update declares {total} bytes, over the limit of {self._limits.max_update_bytes}")
        if not (h.weight > 0 and h.weight < 1e12):
            raise PayloadError(f"update weight must be in (0, 1e12), got {h.weight}")
        if len(h.metrics) > self._limits.max_metrics:
            raise PayloadError(f"{len(h.metrics)} metrics, over the limit of {self._limits.max_metrics}")

    def upload(self, header: serde.UpdateHeader, chunks: Iterator[tuple[int, bytes]], token: str) -> tuple[int, int]:
        self._check_auth(header.job_id, header.client_id, token)
        self._check_shard(header.client_id)
        if is_aggregate_id(header.client_id) and not (self._worker_reduce and self._folds and self._max_weight is None):
            raise AuthError(f"client id {header.client_id} is reserved for workers' partial sums, which job "
                            f"{self.job_id!r} does not take (resources.worker_reduce with a linear strategy)")
        sub = self._subnet(header)
        self._check_header(header, sub)
        with self._lock:
            st = self._state
            if st is None and header.round == self._last_round + 1 and not self._finished:
                # The driver opens a round without waiting for the answer: an upload for the
                # round about to open waits for the open (bounded), anything else is refused.
                self._cond.wait_for(lambda: self._state is not None or self._finished, timeout=self._open_wait_s)
                st = self._state
                if st is None and not self._finished:
                    raise RoundNotOpenYetError(f"round {header.round} is not open yet; retry shortly")
            if st is None or st.round != header.round:
                closed = self._last_closed
                if closed is not None and closed[0] == header.round and header.client_id in closed[1]:
                    # a retry of an update the round counted before it closed (a worker died after
                    # its upload, the round closed on its count): the retry's answer is "counted"
                    raise DuplicateUpdateError(f"client {header.client_id} already uploaded for round {header.round}")
                open_r = None if st is None else st.round
                raise RoundClosedError(f"round {header.round} is not open (open round: {open_r})")
            if header.client_id in st.committed:
                raise DuplicateUpdateError(f"client {header.client_id} already uploaded for round {header.round}")
            if self._inflight >= self._limits.max_inflight:
                raise OverloadedError(
                    f"{self._inflight} uploads in flight (limit {self._limits.max_inflight}); retry after a back-off"
                )
            self._enter("up", header.client_id)
            self._inflight += 1
        held: list[torch.Tensor] = []  # staging buffers of this upload, back to the pool at the end
        try:
            fold = self._folds and not header.weights
            staged, received, decode_s = self._receive(header, chunks, fold, held)
            weight = header.weight if self._max_weight is None else min(header.weight, self._max_weight)
            if fold:  # no turn: at most one add per stripe runs at once, and stripes <= turns
                self._commit(st, header, sub, staged, weight, received, decode_s, fold)
                return header.round, received
            with self._active:  # CPU work only: a slow client's stream never holds a turn
                if header.weights:
                    start = self._start(st)
                    staged = {k: v - start[k] for k, v in staged.items()}
                if self._privacy is not None:  # DP: clip each update, weigh all equally (privacy.py)
                    staged, _ = clip_update(staged, self._privacy.clip_norm)
                    weight = 1.0
                staged = self._strategy.prepare_update(staged)
                self._commit(st, header, sub, staged, weight, received, decode_s, fold)
        finally:
            with self._lock:
                self._inflight -= 1
                self._leave("up", header.client_id)
            self._scratch.give_back(held)
        return header.round, received

    def _commit(self, st: _RoundState, header: serde.UpdateHeader, sub, staged, weight: float, received: int,
                decode_s: float, fold: bool) -> None:
        """Add the update to a free stripe of the round's sum; count it only once that succeeded.
        A close that comes meanwhile waits for this add (`close_round`)."""
        cid = header.client_id
        with self._lock:
            if self._state is not st:
                raise RoundClosedError(f"round {header.round} closed while the upload was streaming")
            if cid in st.committed or cid in st.pending:
                raise DuplicateUpdateError(f"client {cid} already uploaded for round {header.round}")
            st.pending.add(cid)
        if fold and max((t.payload.numel for t in header.tensors), default=0) > ADD_BLOCK:
            # only where a group is added in one pass (add_scaled_many_); small ones add at once
            return self._commit_folds(st, _Fold(header, staged, weight, received, decode_s))
        ok = False
        part = st.stripes.get()
        try:
            if fold:
                part.add_folds(staged, weight)
            elif sub is not None:
                part.add(staged, self._layout, sub, weight)
            else:
                part.add(staged, weight)
            ok = True
        finally:
            st.stripes.put(part)
            with self._cond:
                st.pending.discard(cid)
                if ok:
                    st.committed.add(cid)
                    if is_aggregate_id(cid):  # a worker's partial sum stands for several clients
                        st.represented += max(int(header.metrics.get(CLIENTS_METRIC, 1)), 1) - 1
                    st.bytes_received += received
                    st.decode_s += decode_s
                    self._committed_total += 1
                    self._bytes_total += received
                    self._wake_closer(st)
                if st.folds:  # folded updates wait for a stripe: the first one's thread adds
                    st.folds[0].wake_up()
                if st.closing:
                    self._cond.notify_all()

    def _commit_folds(self, st: _RoundState, item: "_Fold") -> None:
        """Group commit of folded updates: the update joins the round's queue; a thread that finds
        a free stripe adds up to `_GROUP` queued updates in one pass over the sum
        (`add_folds_many`: each block of the float64 sum is read and written once per group, not
        once per update). Every thread returns once its own update is added (or refused): the
        ack still means committed. The result is bit-identical to adding the same updates one by
        one into that stripe. Wake-ups are per update (`_Fold.wake`): the threads of a finished
        group, and the first queued update's thread when a stripe comes free while updates wait
        (it adds the next group); never all waiting threads at once (a burst has dozens)."""
        cond = self._cond
        item.wake.acquire()  # held while armed: the thread waits on it until woken
        with cond:
            st.folds.append(item)
        while True:
            with cond:
                if item.ok is not None:
                    break
                part = None
                if st.folds:
                    try:
                        part = st.stripes.get_nowait()
                    except queue.Empty:
                        pass
                if part is not None:
                    batch = st.folds[:_GROUP]
                    del st.folds[:_GROUP]
            if part is None:
                item.wake.acquire()  # until a group with this update ends or a stripe comes free
                with cond:
                    item.armed = True
                continue
            try:
                self._add_group(part, batch)
            finally:
                st.stripes.put(part)
                with cond:
                    for it in batch:
                        st.pending.discard(it.header.client_id)
                        if it.ok is True:
                            cid = it.header.client_id
                            st.committed.add(cid)
                            if is_aggregate_id(cid):  # a worker's partial sum stands for several clients
                                st.represented += max(int(it.header.metrics.get(CLIENTS_METRIC, 1)), 1) - 1
                            st.bytes_received += it.received
                            st.decode_s += it.decode_s
                            self._committed_total += 1
                            self._bytes_total += it.received
                            self._wake_closer(st)
                        elif it.ok is None:  # the add raised before reaching this one
                            it.ok = RuntimeError("the group this update was added with failed")
                        if it is not item:
                            it.wake_up()
                    if st.folds:  # the stripe is free again: the next queued update's thread adds
                        st.folds[0].wake_up()
                    if st.closing:
                        cond.notify_all()
        if item.ok is not True:
            raise item.ok

    @staticmethod
    def _add_group(part, batch: list["_Fold"]) -> None:
        """Add `batch` into `part`, all at once where possible; mark each update added or not."""
        many = getattr(part, "add_folds_many", None)
        if many is not None and len(batch) > 1:
            try:
                many([(it.staged, it.weight) for it in batch])  # checks all before adding any
            except ValueError:
                pass  # one of them is refused: add one by one below, to refuse only that one
            else:
                for it in batch:
                    it.ok = True
                return
        for it in batch:
            try:
                part.add_folds(it.staged, it.weight)
                it.ok = True
            except Exception as e:
                it.ok = e

    def _receive(self, h: serde.UpdateHeader, chunks: Iterator[tuple[int, bytes]], fold: bool, held: list):
        """Read the stream; validate (and fold or decode) each tensor as soon as its bytes are in.

        A tensor inside one chunk is a zero-copy view of it; one that spans chunks is copied, chunk
        by chunk as they arrive, into a buffer of its declared size, so a header that declares
        gigabytes costs only the bytes that really arrive. Decoded tensors are float32 staging
        buffers; folded ones keep their bytes (that view or buffer) until the commit adds them,
        so an update holds about its own bytes, once, until it commits.
        """
        total = h.total_bytes
        spans, off = [], 0
        for t in h.tensors:
            spans.append((off, off + t.nbytes))
            off += t.nbytes
        staged: dict[str, object] = {}
        filled, nxt, decode_s, empty = 0, 0, 0.0, 0
        partial: np.ndarray | None = None  # the spanning tensor being assembled
        digest = serde.new_digest(h.digest_kind)
        turn = _NO_TURN if fold else self._active

        def done(data) -> None:
            nonlocal nxt
            t = h.tensors[nxt]
            staged[t.name] = self._decode(t, data, fold, held)
            nxt += 1

        for offset, data in chunks:
            n = len(data)
            if not n:
                empty += 1
                if empty > _MAX_EMPTY_CHUNKS:
                    raise PayloadError(f"more than {_MAX_EMPTY_CHUNKS} empty chunks in one upload")
            if offset != filled:
                raise PayloadError(f"chunk at offset {offset}, expected {filled}")
            if filled + n > total:
                raise PayloadError(f"upload sends more than the {total} bytes its header declares")
            mv, c0, c1 = memoryview(data), filled, filled + n
            filled = c1
            # CPU work only (per chunk): a slow stream never holds a turn. Fold mode takes none
            # here: a digest pass is cheap, folds that decode take their own (_decode), and the
            # adds run at commit under its turn; one turn fewer per chunk.
            with turn:
                t0 = time.perf_counter()
                digest.update(data)
                while nxt < len(spans) and spans[nxt][0] <= c1:
                    a, b = spans[nxt]
                    if partial is None and c0 <= a and b <= c1:
                        done(mv[a - c0 : b - c0])
                        continue
                    if partial is None:
                        # np.empty, not bytearray: its pages are touched only as bytes arrive, so
                        # a header that declares gigabytes and sends little costs little
                        partial = np.empty(b - a, np.uint8)
                    lo, hi = max(a, c0), min(b, c1)
                    partial[lo - a : hi - a] = np.frombuffer(mv[lo - c0 : hi - c0], np.uint8)
                    if b > c1:
                        break
                    done(memoryview(partial))
                    partial = None
                decode_s += time.perf_counter() - t0
        while nxt < len(spans) and spans[nxt][0] == spans[nxt][1] == filled:  # trailing empty tensors
            done(memoryview(b""))
        if filled != total:
            raise PayloadError(f"upload ended after {filled} of the {total} bytes its header declares")
        if digest.digest() != h.digest:
            raise PayloadError("upload digest does not match its bytes: corrupted in transit, or no digest sent")
        return staged, total, decode_s

    def _folder(self, t: serde.TensorEntry):
        """The codec's per-metadata fold plan (`Codec.folder`), made once per distinct metadata."""
        plan = self._folders.get(t.key) if t.key else None
        if plan is None:
            plan = self._codec(t.payload).folder(t.payload)
            if t.key and len(t.key) <= _MAX_CACHED_KEY:  # bounded: 4096 keys of at most 1 KiB
                if len(self._folders) >= 4096:
                    self._folders.clear()
                self._folders[t.key] = plan
        return plan

    def _decode(self, t: serde.TensorEntry, data: memoryview, fold: bool, held: list):
        try:
            if fold:
                plan = self._folder(t)
                if getattr(plan, "views_only", False):  # a size check and a view (int8)
                    return plan(data)
                with self._active:  # the plan decodes (fold mode takes no turn per chunk: _receive)
                    return plan(data, scratch=lambda: self._scratch.take(t.payload.numel, held))
            p = Payload(t.payload.codec, t.payload.version, t.payload.dtype, t.payload.shape, t.payload.params, data)
            codec = self._codec(p)
            out = self._scratch.take(p.numel, held) if p.numel else None
            return decode_checked(codec, p, out=out).to(getattr(torch, p.dtype))
        except UnknownCodecError:
            raise
        except PayloadError as e:
            raise PayloadError(f"tensor {t.name!r}: {e}") from None

    def _start(self, st: _RoundState) -> dict:
        """The round's broadcast model as clients decode it (weights uploads are relative to it)."""
        with self._lock:
            if st.start is None:
                if st.broadcast is None:
                    raise PayloadError("this job sends no model down; upload deltas, not weights")
                st.start = decode_broadcast(st.broadcast)
            return st.start

    def download(self, job_id: str, round: int, client_id: int, max_stage: int | None, token: str):
        """The round's model stages, as an iterator: one download per client at a time
        (`max_inflight_per_client`), counted until the iterator is closed."""
        self._check_auth(job_id, client_id, token)
        with self._lock:
            st = self._state
            if st is None or st.round != round or st.broadcast is None:
                raise RoundClosedError(f"round {round} is not open for download")
            self._enter("down", client_id)
        b = st.broadcast
        n = len(b.stages) if max_stage is None else min(max_stage + 1, len(b.stages))
        return _Stages([serde.ModelStage(round, k, len(b.stages), b.stages[k]) for k in range(n)],
                       lambda: self._leave_locked("down", client_id))

    def _leave_locked(self, kind: str, client_id: int) -> None:
        with self._lock:
            self._leave(kind, client_id)

    def get_job(self, job_id: str, client_id: int, token: str) -> serde.JobInfo:
        self._check_auth(job_id, client_id, token)
        st = self._state
        return serde.JobInfo(
            self.job_id, st.round if st else self._last_round, st is not None, self._finished, self._num_rounds,
            self._spec_json, self._addresses,
        )

    def health(self) -> serde.HealthInfo:
        """Status and counters, for the shard's owner (the gRPC Health reply carries the status only)."""
        st = self._state
        status = "NOT_SERVING" if self._finished else "SERVING"
        return serde.HealthInfo(status, self.job_id, 0 if st is None else st.round, self._committed_total, self._bytes_total)


class _Stages(list):
    """A download's stages; `close()` (once) ends the download's per-client count."""

    def __init__(self, stages, release) -> None:
        super().__init__(stages)
        self._release = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


_NO_TURN = contextlib.nullcontext()
_GROUP = 8  # folded updates added in one pass over a stripe, at most


@dataclass(eq=False)
class _Fold:
    """A folded update waiting in its round's queue (`_commit_folds`); `ok` is None until it was
    added, then True or the exception that refused it. Its thread waits on `wake` (a lock held
    while `armed`); `wake_up` (under the core's lock) releases it at most once per arming."""

    header: serde.UpdateHeader
    staged: dict
    weight: float
    received: int
    decode_s: float
    ok: object = None
    wake: threading.Lock = field(default_factory=threading.Lock)
    armed: bool = True

    def wake_up(self) -> None:
        if self.armed:
            self.armed = False
            self.wake.release()

# An upload has no reason to send empty chunks (one, for an update with no bytes); a stream of
# them would keep an admitted upload alive without progress.
_MAX_EMPTY_CHUNKS = 4
_MAX_CACHED_KEY = 1 << 10
_MAX_VERIFIED = 1 << 14  # verified tokens remembered (authenticate), about 3 MB at most


def _max_wire_bytes(codec: Codec, shape: tuple[int, ...]) -> int:
    """The most payload bytes `codec` can emit for `shape`: its exact size where it has one, its
    bound where it declares one, else 8 bytes per element plus 4 KiB (no codec here needs more)."""
    bound = getattr(codec, "max_wire_bytes", None)
    if bound is not None:
        return int(bound(shape))
    exact = codec.wire_bytes(shape)
    return int(exact) if exact is not None else 8 * math.prod(shape) + 4096


def create_server(
    core: AggregationCore, address: str = "127.0.0.1:0", *, max_workers: int | None = None,
    tls: serde.TLSConfig | None = None,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `core` on `address` (port 0 picks a free port); return it and its port.

    max_workers: handler threads; default `limits.max_streams` + 4: every call gRPC admits has a
    thread (threads are made as calls need them), so Health and well-behaved uploads are
    answered while up to max_streams stalled streams wait for `idle_timeout_s`.

    With `tls`, the port serves TLS only (mutual TLS when `tls.client_ca_file` is set).

    Raises:
        RuntimeError: the address could not be bound.
    """
    keep_freed_buffers()  # received chunks reuse freed pages, not fresh ones (heap.py)
    lim = core.limits
    workers = max_workers or lim.max_streams + 4
    header = lim.header_bytes(len(core.shapes))
    # The largest message a fedray client sends is one ~1 MiB chunk with its header: gRPC
    # refuses anything larger from its length prefix (RESOURCE_EXHAUSTED), before buffering it.
    # No BDP probing: the stream window a new call may fill before the server has read anything
    # stays 64 KiB (gRPC still opens a stream's window to the message it is reading, so a 1 MiB
    # chunk flows in one window). With probing the windows grow to megabytes on a fast link, and
    # each refused token-less call pushed that much into the server before its reset
    # (docs/architecture.md, "Hostile clients").
    options = tuple(o for o in serde.GRPC_OPTIONS if o[0] != "grpc.max_receive_message_length") + (
        ("grpc.max_receive_message_length", serde.CHUNK_BYTES + header + (64 << 10)),
        ("grpc.max_concurrent_streams", lim.max_streams_per_connection),
        ("grpc.http2.bdp_probe", 0),
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedray-rpc"),
                         options=options, maximum_concurrent_rpcs=min(lim.max_streams, workers))
    watchdog = StreamWatchdog(idle_s=lim.idle_timeout_s, max_s=lim.max_stream_s)
    serde.add_aggregation_service(
        server, core, job_id=core.job_id, status_of=status_of, watchdog=watchdog,
        max_header_bytes=header, max_batch_updates=lim.max_batch_updates,
    )
    standard = add_standard_health(server)  # grpc.health.v1, for Kubernetes probes and load balancers
    port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        watchdog.stop()
        raise RuntimeError(f"could not bind the aggregation service to {address}")
    server.start()
    standard.serving()
    core.on_finish(standard.not_serving)
    return _Server(server, watchdog, standard), port


class _Server:
    """A started `grpc.Server` with its stream watchdog and standard health; `stop` stops both
    and answers NOT_SERVING to the standard health check while the server drains."""

    def __init__(self, server: grpc.Server, watchdog: StreamWatchdog, standard: StandardHealth) -> None:
        self._server, self.watchdog, self.standard_health = server, watchdog, standard

    def stop(self, grace: float | None = None):
        self.standard_health.shutdown()
        self.watchdog.stop()
        return self._server.stop(grace)

    def __getattr__(self, name: str):
        return getattr(self._server, name)
