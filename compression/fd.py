"""Federated Dropout: `extract` a dense sub-model, `embed` sub-updates back with per-coordinate counts.

A `ModelLayout` says which dimensions of which parameter tensors index the units of a hidden
group (the units of an MLP layer, the filters of a conv layer, the hidden units of a GRU, whose
three gate blocks tile the rows). Inputs and outputs never belong to a group, so they are never
dropped. A `SubnetSpec` is a few scalars; both sides regenerate the kept indices from it, so only
the spec travels.

Aggregation (`CountedSum`) keeps, per coordinate, a float64 weighted sum and a float64 weight
count; `mean_or_keep` averages each coordinate over the clients that trained it and keeps the
global value where nobody did (zero-filling and dividing by all clients would drag untrained
coordinates toward 0). Pruning helpers (Zhu & Gupta's cubic schedule, magnitude masks) live here
too: they are index masks over the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedray.config import KeepRateConfig

__all__ = [
    "POLICIES",
    "SCALINGS",
    "Axis",
    "CountedSum",
    "KeepRateConfig",
    "ModelLayout",
    "SubnetSpec",
    "apply_mask",
    "cubic_sparsity",
    "embed",
    "extract",
    "flops_per_example",
    "input_scales",
    "inverted_scaling",
    "keep_rate_for",
    "magnitude_mask",
    "make_subnet",
    "mlp_flops",
    "submodel_hidden",
]

POLICIES = ("random", "prefix", "rolling")


@dataclass(frozen=True)
class Axis:
    """One tensor dimension indexed by a hidden group.

    The dimension has `tile * units(group) * expand` entries: `tile` consecutive blocks (GRU gate
    blocks r, z, n), each holding `expand` consecutive entries per unit (conv channel flattened
    into H*W features of the next Linear).
    """

    group: str
    tile: int = 1
    expand: int = 1


@dataclass(frozen=True)
class ModelLayout:
    """Which parameter dims belong to which hidden groups, and how to rebuild the model.

    Attributes:
        kind, input_shape, num_classes: as given to `workers.models.build_model`.
        groups: (group name, units) in the order of `build_model`'s `hidden` argument.
        axes: (parameter name, per-dim `Axis` or None) for every parameter; trailing dims that are
            not listed are kept whole.
        shapes: (parameter name, full shape) for every parameter.
        positions: (parameter name, output positions per example) for weight tensors: 1 for a
            Linear, H*W for a conv, T for a 1-D conv or a recurrent layer (for FLOP counts).
    """

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    groups: tuple[tuple[str, int], ...]
    axes: tuple[tuple[str, tuple[Axis | None, ...]], ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    positions: tuple[tuple[str, int], ...] = ()

    def sub_shapes(self, spec: "SubnetSpec | None") -> dict[str, tuple[int, ...]]:
        """Parameter shapes of the sub-model of `spec` (the full model for None)."""
        sizes = self.group_sizes()
        kept = dict(zip(sizes, submodel_hidden(self, spec))) if spec is not None else sizes
        axes = self.axes_of()
        out = {}
        for name, shape in self.shapes:
            s = list(shape)
            for d, ax in enumerate(axes.get(name, ())):
                if ax is not None:
                    s[d] = ax.tile * ax.expand * kept[ax.group]
            out[name] = tuple(s)
        return out

    def group_sizes(self) -> dict[str, int]:
        return dict(self.groups)

    def axes_of(self) -> dict[str, tuple[Axis | None, ...]]:
        return dict(self.axes)


@dataclass(frozen=True)
class SubnetSpec:
    """Everything needed to regenerate one client's kept units in one round.

    `seed` is derived by the caller from (job seed, round, client); `stride` is the rolling
    window's advance per round, in units.
    """

    seed: int
    keep_rate: float
    policy: str = "random"
    round: int = 0
    client: int = 0
    stride: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {self.keep_rate}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.stride < 0:
            raise ValueError(f"stride must be >= 0, got {self.stride}")

    def indices(self, layout: ModelLayout) -> dict[str, torch.Tensor]:
        """Kept unit indices per group: sorted int64 tensors of ceil(keep_rate * units) entries."""
        return {g: _group_indices(self, g, n) for g, n in layout.groups}


def make_subnet(layout: ModelLayout, *, keep_rate: float, policy: str, seed: int, round: int = 0,
                client: int = 0, stride: int = 1) -> dict[str, torch.Tensor]:
    """Kept unit indices per hidden group (see `SubnetSpec.indices`).

    Raises:
        ValueError: keep_rate outside (0, 1] or unknown policy.
    """
    return SubnetSpec(seed, keep_rate, policy, round, client, stride).indices(layout)


def _kept(rate: float, n: int) -> int:
    # The 1e-9 keeps 0.75 * 4 at 3, not 4, when 0.75 * 4 rounds up to 3.0000000000000004.
    return max(1, min(n, math.ceil(rate * n - 1e-9)))


def _group_indices(spec: SubnetSpec, group: str, n: int) -> torch.Tensor:
    k = _kept(spec.keep_rate, n)
    if spec.policy == "prefix" or k == n:
        return torch.arange(k, dtype=torch.int64)
    if spec.policy == "rolling":
        start = (spec.round * spec.stride) % n
        return torch.sort((start + torch.arange(k, dtype=torch.int64)) % n).values
    rng = np.random.default_rng([spec.seed & 0xFFFFFFFFFFFFFFFF, spec.round, spec.client, _stable_hash(group)])
    return torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for b in s.encode():
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def _axis_index(ax: Axis, idx: torch.Tensor, n: int) -> torch.Tensor:
    tiles = torch.arange(ax.tile, dtype=torch.int64)[:, None, None] * (n * ax.expand)
    inner = idx[None, :, None] * ax.expand + torch.arange(ax.expand, dtype=torch.int64)[None, None, :]
    return (tiles + inner).reshape(-1)


def _dim_indices(layout: ModelLayout, spec: SubnetSpec) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Per parameter: (dim, index) pairs to gather or scatter along."""
    kept = spec.indices(layout)
    sizes = layout.group_sizes()
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, axes in layout.axes:
        out[name] = [(d, _axis_index(ax, kept[ax.group], sizes[ax.group]))
                     for d, ax in enumerate(axes) if ax is not None and len(kept[ax.group]) < sizes[ax.group]]
    return out


def extract(global_params: Mapping[str, torch.Tensor], layout: ModelLayout, spec: SubnetSpec) -> dict[str, torch.Tensor]:
    """The client's dense sub-model: each tensor gathered along its grouped dims (new tensors).

    Raises:
        KeyError: a parameter of the layout is missing from `global_params`.
    """
    out = {}
    for name, dims in _dim_indices(layout, spec).items():
        t = global_params[name]
        for d, idx in dims:
            t = t.index_select(d, idx)
        out[name] = t if dims else t.clone()
    return out


def submodel_hidden(layout: ModelLayout, spec: SubnetSpec) -> tuple[int, ...]:
    """The `hidden` argument of `build_model` that gives the sub-model's shapes."""
    return tuple(_kept(spec.keep_rate, n) for _, n in layout.groups)


SCALINGS = ("none", "feedforward", "all")


def input_scales(layout: ModelLayout, spec: SubnetSpec, mode: str = "all") -> dict[str, float]:
    """Inverted-dropout factors of a sub-model's parameters (HeteroFL's "scaler").

    A tensor whose input dims (every dim after the first: torch's Linear, Conv and RNN weights
    are (out, in, ...)) lose units of a group sees `kept / units` of its full-model input; its
    factor is the product of `units / kept` over those dims, so that the sub-model's
    pre-activations match the full model's. `feedforward` leaves out recurrent dims (an input
    dim of the same group as the tensor's output dim: an RNN's hidden-to-hidden kernel); `none`
    gives 1 everywhere. Only parameters with a factor other than 1 are listed.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in SCALINGS:
        raise ValueError(f"dropout.scaling must be one of {SCALINGS}, got {mode!r}")
    if mode == "none":
        return {}
    sizes = layout.group_sizes()
    kept = dict(zip(sizes, submodel_hidden(layout, spec)))
    out = {}
    for name, axes in layout.axes:
        out_group = axes[0].group if axes and axes[0] is not None else None
        f = 1.0
        for ax in axes[1:]:
            if ax is not None and not (mode == "feedforward" and ax.group == out_group):
                f *= sizes[ax.group] / kept[ax.group]
        if f != 1.0:
            out[name] = f
    return out


class inverted_scaling:
    """Train `model` (a sub-model holding unscaled weights W) as if its inputs were scaled by
    `scales` (`input_scales`): inside the block each weight is s * W and its gradient is
    multiplied by s^2, which is exactly SGD on W with the inputs scaled by s (momentum too: it
    is linear in the gradients); on exit the weights are divided by s again, so the caller
    reads trained W, in the full model's scale.
    """

    def __init__(self, model: torch.nn.Module, scales: Mapping[str, float]) -> None:
        params = dict(model.named_parameters())
        missing = [k for k in scales if k not in params]
        if missing:
            raise KeyError(f"the model has no parameter {missing[0]!r} to scale")
        self._items = [(params[k], float(s)) for k, s in scales.items()]
        self._hooks: list = []

    def __enter__(self) -> "inverted_scaling":
        with torch.no_grad():
            for p, s in self._items:
                p.mul_(s)
                self._hooks.append(p.register_hook(lambda g, s2=s * s: g * s2))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        with torch.no_grad():
            for p, s in self._items:
                p.div_(s)


def embed(sub_update: Mapping[str, torch.Tensor], layout: ModelLayout, spec: SubnetSpec,
          weight: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(values, counts) at full shape: weight * sub-update scattered back, zeros elsewhere, and
    the weight at every coordinate the client trained."""
    acc = CountedSum(dict(layout.shapes))
    acc.add(sub_update, layout, spec, weight)
    return {k: v.clone() for k, v in acc.sums.items()}, {k: v.clone() for k, v in acc.counts.items()}


def _scatter_add(dst: torch.Tensor, dims: Sequence[tuple[int, torch.Tensor]], val: torch.Tensor) -> None:
    # One axis at a time: gather the rows, scatter into them along the remaining axes, write back.
    if not dims:
        dst.add_(val)
        return
    (d, idx), rest = dims[0], dims[1:]
    if not rest:
        dst.index_add_(d, idx, val)
        return
    part = dst.index_select(d, idx)
    _scatter_add(part, rest, val)
    dst.index_copy_(d, idx, part)


class CountedSum:
    """Streaming per-coordinate weighted sums and weight counts of sub-model updates.

    Memory is two float64 buffers per tensor, whatever the number of clients.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._shapes = {k: tuple(s) for k, s in shapes.items()}
        self.sums = {k: torch.zeros(s, dtype=torch.float64) for k, s in self._shapes.items()}
        self.counts = {k: torch.zeros(s, dtype=torch.float64) for k, s in self._shapes.items()}
        self.num_updates = 0

    def add(self, sub_update: Mapping[str, torch.Tensor], layout: ModelLayout, spec: SubnetSpec, weight: float) -> None:
        """Fold in one client's sub-model tensors (weights or deltas), weighted by `weight`.

        Raises:
            ValueError: weight <= 0, or tensor names or shapes do not match the subnet.
        """
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        if set(sub_update) != set(self._shapes):
            raise ValueError(f"update tensors {sorted(sub_update)} != expected {sorted(self._shapes)}")
        dims_of = _dim_indices(layout, spec)
        for name, x in sub_update.items():
            dims = dims_of[name]
            want = list(self._shapes[name])
            for d, idx in dims:
                want[d] = len(idx)
            if list(x.shape) != want:
                raise ValueError(f"tensor {name!r}: shape {tuple(x.shape)} != subnet shape {tuple(want)}")
        for name, x in sub_update.items():
            dims = dims_of[name]
            _scatter_add(self.sums[name], dims, x.to(torch.float64) * weight)
            _scatter_add(self.counts[name], dims, torch.full(x.shape, float(weight), dtype=torch.float64))
        self.num_updates += 1

    def merge(self, other: "CountedSum") -> None:
        """Add another partial sum (e.g. another shard's) into this one."""
        for k in self.sums:
            self.sums[k].add_(other.sums[k])
            self.counts[k].add_(other.counts[k])
        self.num_updates += other.num_updates

    def mean_or_keep(self, global_params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per coordinate: weighted mean over the clients that trained it, else the global value.

        For weight uploads. Returns float32 tensors.
        """
        out = {}
        for k, s in self.sums.items():
            c = self.counts[k]
            mean = s / torch.where(c > 0, c, torch.ones_like(c))
            out[k] = torch.where(c > 0, mean, global_params[k].to(torch.float64)).to(torch.float32)
        return out

    def mean_delta(self) -> dict[str, torch.Tensor]:
        """Per coordinate: weighted mean delta over the clients that trained it, 0 elsewhere.

        For delta uploads: `global + server_lr * mean_delta()` (server_lr 1 equals `mean_or_keep`).
        """
        return {k: (s / torch.where(self.counts[k] > 0, self.counts[k], torch.ones_like(s))).to(torch.float32)
                for k, s in self.sums.items()}


def keep_rate_for(client_id: int, round: int, cfg: KeepRateConfig, seed: int = 0) -> float:
    """The keep rate of `client_id` in `round`, from `seed` alone."""
    if len(cfg.keep_rates) == 1:
        return float(cfg.keep_rates[0])
    key = [seed & 0xFFFFFFFFFFFFFFFF, client_id] + ([round] if cfg.mode == "drawn" else [])
    rng = np.random.default_rng(key)
    return float(cfg.keep_rates[rng.choice(len(cfg.keep_rates), p=list(cfg.probs) if cfg.probs else None)])


def flops_per_example(layout: ModelLayout, spec: SubnetSpec | None = None, *, train: bool = True) -> int:
    """Analytic multiply-add FLOPs (2 per MAC) of weight tensors per example; x3 for training
    (forward, input gradient, weight gradient). `spec` None gives the full model."""
    shapes = layout.sub_shapes(spec)
    total = sum(p * math.prod(shapes[name]) for name, p in layout.positions)
    return 2 * total * (3 if train else 1)


def mlp_flops(widths: Sequence[int], *, train: bool = True) -> int:
    """FLOPs per example of an MLP with layer widths (input, hidden..., classes), biases aside."""
    macs = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return 2 * macs * (3 if train else 1)


# --- pruning (server side) ---------------------------------------------------------------------

def cubic_sparsity(round: int, *, start: int, end: int, target: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): s_t = target + (initial - target) * (1 - (t - start) / (end - start))^3,
    `initial` before `start`, `target` from `end` on.

    Raises:
        ValueError: end <= start or sparsities outside [0, 1).
    """
    if end <= start:
        raise ValueError(f"pruning end round {end} must be after start round {start}")
    if not (0 <= initial < 1 and 0 <= target < 1):
        raise ValueError(f"sparsities must be in [0, 1), got initial={initial}, target={target}")
    t = min(max(round, start), end)
    return target + (initial - target) * (1 - (t - start) / (end - start)) ** 3


def magnitude_mask(params: Mapping[str, torch.Tensor], sparsity: float, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Boolean keep-masks: per tensor, the floor(sparsity * n) smallest magnitudes are dropped
    (layer-wise, as Zhu & Gupta). With `weights_only`, 1-D tensors are not pruned (no mask).

    Raises:
        ValueError: sparsity outside [0, 1).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    masks = {}
    for name, t in params.items():
        if weights_only and t.dim() < 2:
            continue
        n_drop = int(math.floor(sparsity * t.numel()))
        keep = torch.ones(t.numel(), dtype=torch.bool)
        if n_drop:
            keep[torch.argsort(t.detach().abs().reshape(-1), stable=True)[:n_drop]] = False
        masks[name] = keep.reshape(t.shape)
    return masks


def apply_mask(params: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned coordinates of `params` in place (tensors or module parameters)."""
    with torch.no_grad():
        for name, m in mask.items():
            params[name].mul_(m.to(params[name].dtype))
