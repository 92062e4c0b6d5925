"""The `strategy:` and `privacy:` sections: which server strategy, its hyperparameters, and
client-level differential privacy. The strategy objects themselves live in
`fedray.orchestrator.strategy` (torch); this module only names and checks them."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Sequence

from pydantic import Field, field_validator, model_validator

from ._base import FieldError, NonEmptyStr, NonNegFloat, NonNegInt, PosFloat, Section

__all__ = ["BUFFERED_STRATEGIES", "DP_STRATEGIES", "STRATEGY_PARAMS", "DPSpec", "StrategySpec", "register_strategy_name"]

# Per strategy, the StrategySpec fields it uses besides clip_norm and proximal_mu (every strategy
# uses those). fedray.orchestrator.strategy builds each of these names.
STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {
    "fedavg": ("server_lr",),
    "fedavgm": ("server_lr", "server_momentum"),
    "fedadam": ("server_lr", "beta1", "beta2", "tau"),
    "fedyogi": ("server_lr", "beta1", "beta2", "tau"),
    "fedadagrad": ("server_lr", "beta1", "tau"),
    "median": ("server_lr",),
    "trimmed_mean": ("server_lr", "trim_ratio"),
    "krum": ("server_lr", "krum_f"),
}
_ALWAYS = ("clip_norm", "proximal_mu", "max_weight_share")
# Robust strategies reduce whole updates: the round collects them all (BufferedUpdates).
BUFFERED_STRATEGIES = ("median", "trimmed_mean", "krum")
# Strategies whose aggregate is the clipped mean, which the Gaussian mechanism's analysis covers.
DP_STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
Unit = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # [0, 1)
_BUILTIN = tuple(STRATEGY_PARAMS)
_PLUGIN_BUFFERED: set[str] = set()  # plug-in strategies that reduce whole updates


def register_strategy_name(name: str, params: Sequence[str], *, buffered: bool = False) -> None:
    """Declare a plug-in strategy's name and the StrategySpec fields it reads
    (`fedray.orchestrator.strategy.register_strategy` calls this and adds the builder).

    Raises:
        ValueError: the name is taken, or `params` names a field StrategySpec does not have.
    """
    if name in STRATEGY_PARAMS:
        raise ValueError(f"strategy {name!r} is registered twice")
    bad = [p for p in params if p not in StrategySpec.model_fields or p == "name"]
    if bad:
        raise ValueError(f"strategy {name!r}: unknown params {bad}; StrategySpec has "
                         f"{', '.join(f for f in StrategySpec.model_fields if f != 'name')}")
    STRATEGY_PARAMS[name] = tuple(params)
    if buffered:
        _PLUGIN_BUFFERED.add(name)


class StrategySpec(Section):
    """The server strategy of a job (`strategy:` in the job spec).

    clip_norm clips every client delta to that L2 norm before aggregation (any strategy);
    proximal_mu is FedProx's proximal weight, used by client training, not by the server;
    max_weight_share caps each client's declared weight (FedAvg's example count) at that share
    of the round's planned total, clients per round x the mean examples per client of the job's
    data (`weight_cap`; docs/strategies.md).
    A field that the named strategy does not use must keep its default, so that a typo'd or
    stale setting is an error rather than silently ignored.
    """

    _section = "strategy"
    _number_style: ClassVar[str] = "interval"
    # Built-ins in the JSON Schema; plug-ins (`fedray.strategies` entry points) are checked by name.
    name: Annotated[str, Field(json_schema_extra={"enum": list(_BUILTIN)})] = "fedavg"
    server_lr: PosFloat = 1.0
    server_momentum: Unit = 0.0
    beta1: Unit = 0.9
    beta2: Unit = 0.99
    tau: PosFloat = 1e-3
    trim_ratio: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.1
    clip_norm: PosFloat | None = None
    krum_f: NonNegInt = 0
    proximal_mu: NonNegFloat = 0.0
    max_weight_share: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v not in STRATEGY_PARAMS:  # a plug-in's strategy: its entry point registers it when imported
            from fedray.plugins import load_group

            load_group("fedray.strategies")
        if v not in STRATEGY_PARAMS:
            raise FieldError("", f"must be one of {', '.join(STRATEGY_PARAMS)}", v)
        return v

    @model_validator(mode="after")
    def _used_fields(self) -> "StrategySpec":
        used = STRATEGY_PARAMS[self.name] + _ALWAYS
        for f, info in type(self).model_fields.items():
            if f not in used and f != "name" and getattr(self, f) != info.default:
                users = [n for n, p in STRATEGY_PARAMS.items() if f in p]
                raise FieldError(f, f"is not used by strategy {self.name!r} (only by {', '.join(users)}); "
                                 f"remove it or change strategy.name", getattr(self, f))
        if self.name == "fedavgm" and self.server_momentum == 0:
            raise FieldError("server_momentum", "fedavgm needs a momentum in (0, 1), e.g. 0.9; "
                             "or use strategy.name: fedavg", self.server_momentum)
        return self

    @property
    def needs_all_updates(self) -> bool:
        """True for median, trimmed_mean, krum: the round must be collected with `BufferedUpdates`."""
        return self.name in BUFFERED_STRATEGIES or self.name in _PLUGIN_BUFFERED

    def weight_cap(self, *, clients_per_round: int, mean_examples: float) -> float | None:
        """The largest weight the service counts for one client (declared weights above it are
        clamped), or None without `max_weight_share`. Fixed for the job, so every shard and a
        resumed run clamp alike."""
        if self.max_weight_share is None:
            return None
        return float(self.max_weight_share * clients_per_round * mean_examples)

    def build(self):
        """The strategy object this spec describes (fresh optimizer state); imports torch."""
        from fedray.orchestrator.strategy import strategy_from_spec

        return strategy_from_spec(self)


class DPSpec(Section):
    """Client-level DP settings (`privacy:` in the job spec).

    noise_multiplier z: noise std on the sum of clipped deltas is z * clip_norm.
    clip_norm C: every client delta is clipped to this L2 norm.
    delta: the delta of the reported (epsilon, delta); well below 1 / number of clients.
    noise_secret_env: environment variable of the driver holding the noise secret (hex, at
        least 16 bytes); unset: a fresh random secret per job (`noise_secret`). The secret never
        leaves the driver (it is not in the spec, GetJob or summary.json; it is in checkpoints,
        so a resumed job adds the same noise).
    """

    _section = "privacy"
    _number_style: ClassVar[str] = "finite"
    noise_multiplier: NonNegFloat
    clip_norm: PosFloat
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 1e-5
    noise_secret_env: NonEmptyStr = "FEDRAY_NOISE_SECRET"

    def check_strategy(self, name: str) -> None:
        """DP's noise is calibrated for the clipped mean; median, trimmed mean and Krum are not covered.

        Raises:
            SpecError: the strategy is not one of the mean-based ones.
        """
        from ._base import SpecError

        if name not in DP_STRATEGIES:
            raise SpecError(f"privacy.noise_multiplier: differential privacy needs a mean-based strategy "
                            f"({', '.join(DP_STRATEGIES)}), not strategy.name, got {name!r}")

    def accountant(self, *, sample_rate: float, orders: Sequence[float] | None = None) -> Any:
        """An RDP accountant for this noise with clients sampled at `sample_rate` per round (imports torch)."""
        from fedray.orchestrator.privacy import DEFAULT_ORDERS, RDPAccountant

        return RDPAccountant(self.noise_multiplier, sample_rate, orders=DEFAULT_ORDERS if orders is None else orders)
