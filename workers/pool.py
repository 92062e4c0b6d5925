"""The worker pool: a few Ray actors (about one per core), each training many virtual clients per
call, and an in-process twin with the same interface for unit tests.

The pool composes Ray's public API (actor handles, `ObjectRef`s, `ray.wait`); it never
subclasses Ray classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray

from .client import ClientResult, ClientTrainer, TrainerSetup

__all__ = ["LocalPool", "RayPool", "WorkerPool", "default_num_workers", "freeze_heap", "ship_task_code"]

OnBatch = Callable[[list[ClientResult]], None]


class WorkerPool:
    """Interface: `run_round` trains `client_ids` and returns one result per client."""

    def run_round(
        self, round: int, broadcast: Any, client_ids: Sequence[int], servers: Sequence[str], *,
        on_batch: OnBatch | None = None, on_dispatch: Callable[[], None] | None = None,
    ) -> list[ClientResult]:
        """`on_dispatch` is called once, as soon as the first calls are sent (before any result):
        the driver sends its other messages of the round while the workers already train."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


def _batches(client_ids: Sequence[int], size: int) -> list[list[int]]:
    ids = [int(c) for c in client_ids]
    return [ids[i : i + size] for i in range(0, len(ids), size)]


class LocalPool(WorkerPool):
    """Runs the same `ClientTrainer` in this process: for tests and debugging."""

    def __init__(self, setup: TrainerSetup, task, *, clients_per_call: int = 10) -> None:
        self._trainer = ClientTrainer(setup, task)
        self._per_call = clients_per_call

    def run_round(self, round, broadcast, client_ids, servers, *, on_batch=None, on_dispatch=None):
        if on_dispatch:
            on_dispatch()
        out = []
        for b in _batches(client_ids, self._per_call):
            res = self._trainer.train_clients(round, broadcast, b, servers)
            if on_batch:
                on_batch(res)
            out.extend(res)
        return out

    def shutdown(self) -> None:
        self._trainer.close()


@ray.remote
class _WorkerActor:
    def __init__(self, setup: TrainerSetup, task, job: str = "fedray", index: int = 0) -> None:
        self._label = f"fedray job={job} role=worker index={index}"  # first: repr() reports a failed __init__
        self._t = ClientTrainer(setup, task)
        freeze_heap()

    def __repr__(self) -> str:  # the Ray dashboard's Actors page shows it (column "Repr", filterable)
        return self._label

    def train_clients(self, round: int, broadcast, client_ids: list[int], servers, attempt: int) -> list[ClientResult]:
        return self._t.train_clients(round, broadcast, client_ids, servers, attempt)

    def ping(self) -> bool:
        return True


@dataclass
class _Slot:
    actor: Any
    index: int
    inflight: int = 0


@dataclass(frozen=True)
class _Batch:
    client_ids: list[int]
    attempt: int = 0


@dataclass
class _Round:
    """A round in flight in a `RayPool` (`submit_round` to `collect_round`)."""

    round: int
    broadcast: Any
    client_ids: list
    servers: tuple
    todo: list  # batches not sent yet, the next one last
    pending: dict = field(default_factory=dict)  # ref -> (slot, batch, actor)


class RayPool(WorkerPool):
    """`num_workers` Ray actors; each call trains `clients_per_call` clients.

    The task is put into the object store once and shared by all actors (a built-in task's
    numpy arrays are read without a copy); each actor asks it for its clients' data. Up to two calls are kept in flight per actor so that an actor never
    idles while the driver handles a result. An actor that dies is replaced and its batch retried
    (attempt + 1) up to `max_attempts`; the service's exactly-once check makes a retry of an
    already-committed client count once.
    """

    def __init__(
        self, setup: TrainerSetup, task, *, num_workers: int,
        clients_per_call: int = 10, num_cpus: float = 1.0, num_gpus: float = 0.0, job_name: str = "fedray",
        max_attempts: int = 3, start_timeout_s: float = 300.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        ship_task_code(task)
        self._args = (setup, ray.put(task))
        self._opts = dict(num_cpus=num_cpus, num_gpus=num_gpus)
        self._job = job_name
        self._per_call = clients_per_call
        self._max_attempts = max_attempts
        self._spawned = 0
        self.replaced = 0
        self._slots = [_Slot(self._spawn(), i) for i in range(num_workers)]
        pings = [s.actor.ping.remote() for s in self._slots]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=start_timeout_s)
        if len(ready) < len(pings):
            have = ray.cluster_resources()
            self.shutdown()
            raise RuntimeError(
                f"{len(pings) - len(ready)} of {num_workers} worker actors did not start within {start_timeout_s:.0f} s: "
                f"each asks for {num_cpus} CPU and {num_gpus} GPU, the cluster has {have.get('CPU', 0)} CPU and "
                f"{have.get('GPU', 0)} GPU; lower resources.num_workers or resources.cpus_per_worker/gpus_per_worker"
            )
        ray.get(pings)

    def _spawn(self):
        index = self._spawned
        self._spawned += 1
        return _WorkerActor.options(name=f"{self._job}:worker-{index}", **self._opts).remote(
            *self._args, job=self._job, index=index)

    @property
    def actors(self) -> list:
        """The live worker actor handles (for monitoring and fault-injection tests)."""
        return [s.actor for s in self._slots]

    def run_round(self, round, broadcast_ref, client_ids, servers, *, on_batch=None, on_dispatch=None):
        return self.collect_round(self.submit_round(round, broadcast_ref, client_ids, servers, on_dispatch=on_dispatch),
                                  on_batch=on_batch)

    def submit_round(self, round, broadcast_ref, client_ids, servers, *, on_dispatch=None) -> "_Round":
        """The first half of `run_round`: send the first calls (then `on_dispatch()`); the driver
        may do other work before `collect_round` waits for the results."""
        rd = _Round(round, broadcast_ref, list(client_ids), tuple(servers),
                    [_Batch(b) for b in _batches(client_ids, self._per_call)][::-1])
        self._fill(rd)
        if on_dispatch:
            on_dispatch()
        return rd

    def collect_round(self, rd: "_Round", *, on_batch=None) -> list[ClientResult]:
        """The second half of `run_round`: wait for every call (retrying those of dead actors)."""
        out: list[ClientResult] = []
        while rd.pending:
            done, _ = ray.wait(list(rd.pending), num_returns=1)
            for ref in done:
                slot, b, actor = rd.pending.pop(ref)
                if slot.actor is actor:
                    slot.inflight -= 1
                try:
                    res = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    res = self._on_actor_death(slot, b, actor, rd.todo, rd.round, e)
                if on_batch and res:
                    on_batch(res)
                out.extend(res)
            self._fill(rd)
        order = {int(c): i for i, c in enumerate(rd.client_ids)}
        out.sort(key=lambda r: order[r.client_id])
        return out

    def _fill(self, rd: "_Round") -> None:
        """The least busy actor first: every actor has a call before any has two."""
        while rd.todo:
            slot = min(self._slots, key=lambda s: s.inflight)
            if slot.inflight >= 2:
                return
            b = rd.todo.pop()
            ref = slot.actor.train_clients.remote(rd.round, rd.broadcast, b.client_ids, rd.servers, b.attempt)
            rd.pending[ref] = (slot, b, slot.actor)
            slot.inflight += 1

    def _on_actor_death(self, slot: _Slot, b: _Batch, actor, todo: list, round: int, err: Exception) -> list[ClientResult]:
        if slot.actor is actor:  # not replaced yet (its other in-flight call may fail next)
            slot.actor = self._spawn()
            slot.inflight = 0
            self.replaced += 1
        if b.attempt + 1 < self._max_attempts:
            todo.append(_Batch(b.client_ids, b.attempt + 1))
            return []
        msg = f"worker died {self._max_attempts} times: {type(err).__name__}"
        return [ClientResult(c, round, error=f"client {c}, round {round}, stage worker: {msg}") for c in b.client_ids]

    def shutdown(self) -> None:
        for s in self._slots:
            ray.kill(s.actor)
        self._slots = []


def ship_task_code(task) -> None:
    """Pickle the task's own module by value when it is not installed (a file beside the job
    spec, a notebook's `__main__`): worker actors then need no copy of it on their path."""
    import sys

    from ray import cloudpickle

    mod = type(task).__module__
    if mod == "__main__" or mod.split(".")[0] == "fedray":
        return
    m = sys.modules.get(mod)
    path = getattr(m, "__file__", None) or ""
    if m is not None and "site-packages" not in path and "dist-packages" not in path:
        cloudpickle.register_pickle_by_value(m)


def freeze_heap() -> None:
    """Move everything allocated so far (Ray, torch, the data set) out of the garbage collector's
    reach: a full collection would otherwise scan those objects again and again while the actor
    serves calls that allocate many small ones."""
    import gc

    gc.collect()
    gc.freeze()


def default_num_workers() -> int:
    """One worker per CPU that Ray reports (at least one)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
