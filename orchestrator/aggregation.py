"""Streaming aggregation math: a running weighted sum, one update at a time (no Ray, no gRPC).

Sums are kept in float64 so that the order in which updates arrive changes the result only far
below float32 resolution: the same seed gives the same model whatever the arrival order.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["FedAvg", "RunningWeightedSum"]


class RunningWeightedSum:
    """sum_i w_i * x_i and sum_i w_i over updates folded in one at a time.

    Memory is O(model): one float64 buffer per tensor, whatever the number of clients.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._shapes = {k: tuple(s) for k, s in shapes.items()}
        self.sums = {k: torch.zeros(s, dtype=torch.float64) for k, s in self._shapes.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one update in.

        Raises:
            ValueError: tensor names or shapes differ from the template, or weight <= 0.
        """
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        if set(update) != set(self._shapes):
            raise ValueError(f"update tensors {sorted(update)} != expected {sorted(self._shapes)}")
        for k, x in update.items():
            if tuple(x.shape) != self._shapes[k]:
                raise ValueError(f"tensor {k!r}: shape {tuple(x.shape)} != expected {self._shapes[k]}")
        for k, x in update.items():
            self.sums[k].add_(x.to(torch.float64), alpha=weight)
        self.total_weight += weight
        self.count += 1

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


class FedAvg:
    """FedAvg on model deltas: new = global + server_lr * weighted mean of client deltas."""

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def apply(self, global_params: Mapping[str, torch.Tensor], agg: RunningWeightedSum) -> dict[str, torch.Tensor]:
        mean = agg.mean()
        return {k: global_params[k] + self.server_lr * mean[k] for k in global_params}
