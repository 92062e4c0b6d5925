"""Server strategies: a few hooks, with variants built by composition (no Ray, no gRPC).

A strategy is FedAvg's skeleton with three parts swapped in:

* a `Reducer` (aggregation.py) turns the round's client deltas into one delta: weighted mean,
  coordinate-wise median, trimmed mean, Krum;
* a `ServerOptimizer` applies it (Reddi et al. 2021, "Adaptive Federated Optimization"): the
  pseudo-gradient is g = -delta and the optimizer steps on it. Plain SGD with lr 1 is FedAvg;
  momentum is FedAvgM; Adam, Yogi and Adagrad give FedAdam, FedYogi and FedAdagrad;
* optional per-client norm clipping (`clip_norm`) before an update is folded in.

So FedAdam is `FedAvg(server_optimizer=ServerAdam(lr=0.01))`; `build_strategy` and `StrategySpec`
name the usual combinations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch

from fedray.config import STRATEGY_PARAMS, SpecError, StrategySpec

from .aggregation import (
    BufferedUpdates, Collector, CoordinateMedian, Krum, Reducer, RunningWeightedSum, TrimmedMean,
    WeightedMean, clip_update,
)

__all__ = [
    "FedAvg",
    "ServerAdagrad",
    "ServerAdam",
    "ServerOptState",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "Strategy",
    "StrategySpec",
    "aggregate_metrics",
    "available_strategies",
    "build_strategy",
    "strategy_from_spec",
]

Params = Mapping[str, torch.Tensor]


class Strategy(Protocol):
    """The hooks the round loop calls, in order, every round."""

    def new_collector(self, shapes: Mapping[str, tuple[int, ...]], *, max_clients: int) -> Collector: ...
    def prepare_update(self, update: Params) -> dict[str, torch.Tensor]: ...
    def reduce(self, agg: Collector) -> dict[str, torch.Tensor]: ...
    def step(self, global_params: Params, delta: Params) -> dict[str, torch.Tensor]: ...
    def aggregate(self, global_params: Params, agg: Collector) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# -- server optimizers ----------------------------------------------------------------------------

@dataclass
class ServerOptState:
    """A server optimizer's memory: step count and per-tensor slots (e.g. {"m": {...}, "v": {...}})."""

    step: int = 0
    slots: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "slots": {s: {k: t.clone() for k, t in d.items()} for s, d in self.slots.items()}}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "ServerOptState":
        return cls(int(d["step"]), {s: {k: t.clone() for k, t in v.items()} for s, v in d["slots"].items()})


class ServerOptimizer(Protocol):
    """Hyperparameters only (frozen); the memory lives in a `ServerOptState`."""

    lr: float

    def init(self, params: Params) -> ServerOptState: ...
    def update(self, state: ServerOptState, params: Params, grad: Params) -> dict[str, torch.Tensor]:
        """New parameters from the pseudo-gradient; advances `state` in place."""


def _unit(name: str, v: Any, *, closed_hi: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (0 <= v <= 1 if closed_hi else 0 <= v < 1)
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed_hi else ')'}, got {v!r}")


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


@dataclass(frozen=True)
class ServerSGD:
    """x <- x - lr * b with b <- momentum * b + g (b = g on the first step). momentum 0: FedAvg with
    server learning rate lr; momentum > 0: FedAvgM (Hsu et al. 2019)."""

    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _unit("momentum", self.momentum)

    def init(self, params: Params) -> ServerOptState:
        return ServerOptState()

    def update(self, state: ServerOptState, params: Params, grad: Params) -> dict[str, torch.Tensor]:
        state.step += 1
        if self.momentum == 0:
            return {k: params[k] - self.lr * grad[k] for k in params}
        buf = state.slots.setdefault("momentum", {})
        for k in params:
            buf[k] = grad[k].clone() if k not in buf else self.momentum * buf[k] + grad[k]
        return {k: params[k] - self.lr * buf[k] for k in params}


@dataclass(frozen=True)
class _Adaptive:
    """Reddi et al. 2021, Algorithm 2, on g = -delta:
    m <- beta1 m + (1 - beta1) g;  v <- second_moment(v, g^2);  x <- x - lr m / (sqrt(v) + tau),
    with m = 0 and v = tau^2 at the start (the paper's v_{-1} >= tau^2) and no bias correction."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _unit("beta1", self.beta1)
        _unit("beta2", self.beta2)
        _positive("tau", self.tau)

    def init(self, params: Params) -> ServerOptState:
        return ServerOptState(0, {
            "m": {k: torch.zeros_like(p) for k, p in params.items()},
            "v": {k: torch.full_like(p, self.tau ** 2) for k, p in params.items()},
        })

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:  # Adam, Yogi, Adagrad define it
        raise NotImplementedError(f"{type(self).__name__} must define its second-moment update")

    def update(self, state: ServerOptState, params: Params, grad: Params) -> dict[str, torch.Tensor]:
        state.step += 1
        m, v, out = state.slots["m"], state.slots["v"], {}
        for k in params:
            g = grad[k]
            m[k] = self.beta1 * m[k] + (1 - self.beta1) * g
            v[k] = self._second_moment(v[k], g * g)
            out[k] = params[k] - self.lr * m[k] / (torch.sqrt(v[k]) + self.tau)
        return out


@dataclass(frozen=True)
class ServerAdam(_Adaptive):
    """FedAdam's optimizer: v <- beta2 v + (1 - beta2) g^2."""

    def _second_moment(self, v, g2):
        return self.beta2 * v + (1 - self.beta2) * g2


@dataclass(frozen=True)
class ServerYogi(_Adaptive):
    """FedYogi's optimizer: v <- v - (1 - beta2) g^2 sign(v - g^2)."""

    def _second_moment(self, v, g2):
        return v - (1 - self.beta2) * g2 * torch.sign(v - g2)


@dataclass(frozen=True)
class ServerAdagrad(_Adaptive):
    """FedAdagrad's optimizer: v <- v + g^2 (beta2 unused)."""

    def _second_moment(self, v, g2):
        return v + g2


# -- the strategy --------------------------------------------------------------------------------

class FedAvg:
    """FedAvg on client deltas, with a pluggable reducer, server optimizer and per-client clipping.

    new = optimizer.update(global, g = -reduce(deltas)); with the defaults (weighted mean, SGD with
    lr = server_lr) that is global + server_lr * weighted mean of the deltas.
    """

    def __init__(self, *, server_lr: float = 1.0, server_optimizer: ServerOptimizer | None = None,
                 aggregator: Reducer | None = None, clip_norm: float | None = None) -> None:
        """
        Raises:
            ValueError: server_lr <= 0, server_lr set together with a server_optimizer (give the
                optimizer its lr), or clip_norm <= 0.
        """
        _positive("server_lr", server_lr)
        if server_optimizer is not None and server_lr != 1.0:
            raise ValueError("server_lr: set the learning rate on the server_optimizer instead, not both")
        if clip_norm is not None:
            _positive("clip_norm", clip_norm)
        self.optimizer: ServerOptimizer = server_optimizer or ServerSGD(lr=server_lr)
        self.aggregator: Reducer = aggregator or WeightedMean()
        self.clip_norm = clip_norm
        self._opt_state: ServerOptState | None = None

    @property
    def server_lr(self) -> float:
        return self.optimizer.lr

    @property
    def needs_all_updates(self) -> bool:
        """True when the round must be collected with `BufferedUpdates` (median, trimmed mean, Krum)."""
        return self.aggregator.buffered

    @property
    def folds_raw_updates(self) -> bool:
        """True when updates go into a `RunningWeightedSum` unchanged (no clipping): the service
        may then fold each payload's codes straight into the sum (`Codec.fold`)."""
        return not self.aggregator.buffered and self.clip_norm is None

    def __repr__(self) -> str:
        return f"FedAvg(aggregator={self.aggregator!r}, server_optimizer={self.optimizer!r}, clip_norm={self.clip_norm})"

    def new_collector(self, shapes: Mapping[str, tuple[int, ...]], *, max_clients: int,
                      max_bytes: int | None = None) -> Collector:
        """An empty collector for one round (or one shard's share of it).

        Raises:
            ValueError: a buffered strategy's max_clients x model bytes is over max_bytes.
        """
        if self.aggregator.buffered:
            return BufferedUpdates(shapes, max_clients=max_clients, max_bytes=max_bytes)
        return RunningWeightedSum(shapes)

    def prepare_update(self, update: Params) -> dict[str, torch.Tensor]:
        """One client's delta as it should be folded in: clipped to clip_norm when set.

        Raises:
            ValueError: clipping and the update has a non-finite norm.
        """
        if self.clip_norm is None:
            return dict(update)
        return clip_update(update, self.clip_norm)[0]

    def reduce(self, agg: Collector) -> dict[str, torch.Tensor]:
        """The round's aggregated delta (float32).

        Raises:
            ValueError: nothing was collected, or too few updates for Krum.
            TypeError: a buffered reducer got a RunningWeightedSum.
        """
        return self.aggregator.reduce(agg)

    def step(self, global_params: Params, delta: Params) -> dict[str, torch.Tensor]:
        """Apply an aggregated delta (possibly with DP noise added) with the server optimizer."""
        if self._opt_state is None:
            self._opt_state = self.optimizer.init(global_params)
        grad = {k: -delta[k].to(global_params[k].dtype) for k in global_params}
        return self.optimizer.update(self._opt_state, global_params, grad)

    def aggregate(self, global_params: Params, agg: Collector) -> dict[str, torch.Tensor]:
        """step(global_params, reduce(agg)).

        Raises:
            ValueError, TypeError: as `reduce`.
        """
        return self.step(global_params, self.reduce(agg))

    apply = aggregate  # the name the round loop used before strategies were pluggable

    def state_dict(self) -> dict[str, Any]:
        """The server optimizer's memory (tensors cloned), for a bit-identical resume."""
        return {"optimizer": None if self._opt_state is None else self._opt_state.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; an empty mapping means a fresh start."""
        opt = state.get("optimizer")
        self._opt_state = None if opt is None else ServerOptState.from_state_dict(opt)


# -- registry: the strategy objects for the names of `fedray.config.StrategySpec` -----------------

_BUILDERS: dict[str, Callable[[StrategySpec], FedAvg]] = {
    "fedavg": lambda s: FedAvg(server_lr=s.server_lr, clip_norm=s.clip_norm),
    "fedavgm": lambda s: FedAvg(server_optimizer=ServerSGD(lr=s.server_lr, momentum=s.server_momentum),
                                clip_norm=s.clip_norm),
    "fedadam": lambda s: FedAvg(server_optimizer=ServerAdam(lr=s.server_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau),
                                clip_norm=s.clip_norm),
    "fedyogi": lambda s: FedAvg(server_optimizer=ServerYogi(lr=s.server_lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau),
                                clip_norm=s.clip_norm),
    "fedadagrad": lambda s: FedAvg(server_optimizer=ServerAdagrad(lr=s.server_lr, beta1=s.beta1, tau=s.tau),
                                   clip_norm=s.clip_norm),
    "median": lambda s: FedAvg(server_lr=s.server_lr, aggregator=CoordinateMedian(), clip_norm=s.clip_norm),
    "trimmed_mean": lambda s: FedAvg(server_lr=s.server_lr, aggregator=TrimmedMean(s.trim_ratio),
                                     clip_norm=s.clip_norm),
    "krum": lambda s: FedAvg(server_lr=s.server_lr, aggregator=Krum(f=s.krum_f), clip_norm=s.clip_norm),
}
def available_strategies() -> tuple[str, ...]:
    return tuple(STRATEGY_PARAMS)


def strategy_from_spec(spec: StrategySpec) -> FedAvg:
    """The strategy object `spec` describes (fresh optimizer state); `StrategySpec.build()`."""
    return _BUILDERS[spec.name](spec)


def build_strategy(name: str, **params: Any) -> FedAvg:
    """A strategy by registry name, e.g. `build_strategy("fedadam", server_lr=0.01, tau=1e-3)`.

    Parameters are `StrategySpec` fields; each name accepts only the ones it uses, plus clip_norm
    and proximal_mu.

    Raises:
        SpecError: unknown name, unknown or unused parameter, or a value out of range; the message
            starts with `strategy.<parameter>`.
    """
    names = set(StrategySpec.model_fields) - {"name"}
    for k in params:
        if k not in names:
            raise SpecError(f"strategy.{k}: unknown parameter; strategies take {', '.join(sorted(names))}")
    return StrategySpec(name=name, **params).build()


# -- evaluation metrics ----------------------------------------------------------------------------

def aggregate_metrics(results: Iterable[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Weighted means of client metrics: for each key, sum w_i m_i / sum w_i over the clients that
    report it (e.g. weight = number of test examples).

    Raises:
        ValueError: no results, a weight that is not finite and > 0, or a non-numeric or
            non-finite metric value (the message names it).
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    n = 0
    for w, metrics in results:
        n += 1
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 < w < math.inf):
            raise ValueError(f"metrics weight must be a finite number > 0, got {w!r}")
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"metric {k!r}: must be a finite number, got {v!r}")
            sums[k] = sums.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    if n == 0:
        raise ValueError("no metrics to aggregate")
    return {k: sums[k] / weights[k] for k in sums}
