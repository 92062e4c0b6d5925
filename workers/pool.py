"""The worker pool: a few Ray actors (about one per core), each training many virtual clients per
call, and an in-process twin with the same interface for unit tests.

The pool composes Ray's public API (actor handles, `ObjectRef`s, `ray.wait`); it never
subclasses Ray classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray

from .client import ClientResult, ClientTrainer, TrainerSetup
from .data import Dataset, Partition

__all__ = ["LocalPool", "RayPool", "WorkerPool", "default_num_workers"]

OnBatch = Callable[[list[ClientResult]], None]


class WorkerPool:
    """Interface: `run_round` trains `client_ids` and returns one result per client."""

    def run_round(self, round: int, broadcast: Any, client_ids: Sequence[int], *, on_batch: OnBatch | None = None) -> list[ClientResult]:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


def _batches(client_ids: Sequence[int], size: int) -> list[list[int]]:
    ids = [int(c) for c in client_ids]
    return [ids[i : i + size] for i in range(0, len(ids), size)]


class LocalPool(WorkerPool):
    """Runs the same `ClientTrainer` in this process: for tests and debugging."""

    def __init__(self, setup: TrainerSetup, data: Dataset, parts: Partition, *, clients_per_call: int = 10) -> None:
        self._trainer = ClientTrainer(setup, data, parts)
        self._per_call = clients_per_call

    def run_round(self, round, broadcast, client_ids, *, on_batch=None):
        out = []
        for b in _batches(client_ids, self._per_call):
            res = self._trainer.train_clients(round, broadcast, b)
            if on_batch:
                on_batch(res)
            out.extend(res)
        return out

    def shutdown(self) -> None:
        self._trainer.close()


@ray.remote
class _WorkerActor:
    def __init__(self, setup: TrainerSetup, data: Dataset, parts: Partition) -> None:
        self._t = ClientTrainer(setup, data, parts)

    def train_clients(self, round: int, broadcast, client_ids: list[int]) -> list[ClientResult]:
        return self._t.train_clients(round, broadcast, client_ids)

    def ping(self) -> bool:
        return True


@dataclass
class _Slot:
    actor: Any
    inflight: int = 0


class RayPool(WorkerPool):
    """`num_workers` Ray actors; each call trains `clients_per_call` clients.

    The data set and partition are put into the object store once and shared by all actors
    (zero-copy numpy reads). Up to two calls are kept in flight per actor so that an actor never
    idles while the driver handles a result.
    """

    def __init__(
        self, setup: TrainerSetup, data: Dataset, parts: Partition, *, num_workers: int,
        clients_per_call: int = 10, num_cpus: float = 1.0, num_gpus: float = 0.0, job_name: str = "fedray",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        data_ref, parts_ref = ray.put(data), ray.put(parts)
        self._slots = [
            _Slot(_WorkerActor.options(num_cpus=num_cpus, num_gpus=num_gpus, name=f"{job_name}:worker-{i}").remote(setup, data_ref, parts_ref))
            for i in range(num_workers)
        ]
        self._per_call = clients_per_call
        ray.get([s.actor.ping.remote() for s in self._slots])

    def run_round(self, round, broadcast_ref, client_ids, *, on_batch=None):
        todo = _batches(client_ids, self._per_call)[::-1]
        pending: dict[Any, _Slot] = {}
        out: list[ClientResult] = []

        def fill():
            for slot in sorted(self._slots, key=lambda s: s.inflight):
                while todo and slot.inflight < 2:
                    ref = slot.actor.train_clients.remote(round, broadcast_ref, todo.pop())
                    pending[ref] = slot
                    slot.inflight += 1

        fill()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                slot = pending.pop(ref)
                slot.inflight -= 1
                res = ray.get(ref)
                if on_batch:
                    on_batch(res)
                out.extend(res)
            fill()
        order = {int(c): i for i, c in enumerate(client_ids)}
        out.sort(key=lambda r: order[r.client_id])
        return out

    def shutdown(self) -> None:
        for s in self._slots:
            ray.kill(s.actor)
        self._slots = []


def default_num_workers() -> int:
    """One worker per CPU that Ray reports (at least one)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))

