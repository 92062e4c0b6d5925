"""Models clients train, and conversion between torch modules and named float32 tensors."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["build_model", "get_params", "num_params", "set_params"]


def build_model(kind: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> nn.Module:
    """Build a model. `mlp`: flatten, then Linear+ReLU per hidden width, then a Linear head.

    Raises:
        ValueError: unknown kind.
    """
    if kind != "mlp":
        raise ValueError(f"unknown model kind {kind!r}; choose mlp")
    d_in = 1
    for s in input_shape:
        d_in *= int(s)
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU()]
        d_in = h
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)


def get_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached float32 copy of every parameter, by name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def set_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(params[k])


def num_params(params: Mapping[str, torch.Tensor]) -> int:
    return sum(int(v.numel()) for v in params.values())
