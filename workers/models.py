"""The built-in models' builders and Federated Dropout axes (which name maps to which is
`fedray.builtin_tasks`'s business), and conversion between torch modules and named tensors."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fedray.compression.fd import Axis, ModelLayout

__all__ = ["build_model", "cnn", "conv1d", "conv1d_axes", "get_params", "gru", "gru_axes", "layout_from_axes",
           "layout_of", "mlp", "model_layout", "num_params", "sequential_axes", "set_params"]


def build_model(kind: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> nn.Module:
    """A built-in model by kind (`fedray.builtin_tasks.build_builtin_model`, where the kinds are
    listed and documented).

    Raises:
        ValueError: unknown kind, or a shape the kind cannot take.
    """
    from fedray.builtin_tasks import build_builtin_model

    return build_builtin_model(kind, input_shape, num_classes, hidden)


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    d_in = 1
    for s in input_shape:
        d_in *= int(s)
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU()]
        d_in = h
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    if len(hidden) != 3:
        raise ValueError(f"cnn: hidden must be (c1, c2, fc), got {hidden}")
    if len(input_shape) not in (2, 3) or input_shape[-1] % 4 or input_shape[-2] % 4:
        raise ValueError(f"cnn: input_shape must be (H, W) or (C, H, W) with H, W divisible by 4, got {input_shape}")
    c_in = input_shape[0] if len(input_shape) == 3 else 1
    h, w = input_shape[-2] // 4, input_shape[-1] // 4
    c1, c2, fc = hidden
    layers: list[nn.Module] = [nn.Unflatten(1, (1, input_shape[0]))] if len(input_shape) == 2 else []
    layers += [
        nn.Conv2d(c_in, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * h * w, fc), nn.ReLU(), nn.Linear(fc, num_classes),
    ]
    return nn.Sequential(*layers)


def conv1d(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    if len(input_shape) != 2 or not hidden:
        raise ValueError(f"conv1d: input_shape must be (T, F) and hidden non-empty, got {input_shape}, {hidden}")
    return _Conv1dNet(input_shape[1], num_classes, hidden)


def gru(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    if len(input_shape) != 2 or not hidden:
        raise ValueError(f"gru: input_shape must be (T, F) and hidden non-empty, got {input_shape}, {hidden}")
    return _GRUNet(input_shape[1], num_classes, hidden)


class _Conv1dNet(nn.Module):
    def __init__(self, features: int, num_classes: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = features
        for h in hidden:
            layers += [nn.Conv1d(c, h, 3, padding=1), nn.ReLU()]
            c = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.transpose(1, 2)).mean(dim=2))


class _GRUNet(nn.Module):
    def __init__(self, features: int, num_classes: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        dims = (features,) + hidden
        self.rnns = nn.ModuleList(nn.GRU(a, b, batch_first=True) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hidden[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for rnn in self.rnns:
            x, _ = rnn(x)
        return self.head(x[:, -1])


def model_layout(kind: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> ModelLayout:
    """The Federated Dropout layout of `build_model(kind, input_shape, num_classes, hidden)`
    (`fedray.builtin_tasks.builtin_model_layout`).

    Raises:
        ValueError: as `build_model`.
    """
    from fedray.builtin_tasks import builtin_model_layout

    return builtin_model_layout(kind, input_shape, num_classes, hidden)


def layout_from_axes(model: nn.Module, axes_fn) -> ModelLayout:
    """The layout of a model stamped by `build_model` (`fedray_arch`): hidden group `h{i}` is
    hidden width i (units, filters or GRU hidden units); `axes_fn(model, input_shape, hidden)`
    gives each tensor's axes and FLOP positions."""
    kind, input_shape, num_classes, hidden = model.fedray_arch
    groups = tuple((f"h{i}", h) for i, h in enumerate(hidden))
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    axes, positions = axes_fn(model, input_shape, hidden)
    return ModelLayout(kind, tuple(input_shape), num_classes, groups,
                       tuple((k, tuple(axes[k])) for k, _ in shapes), shapes, tuple(positions.items()))


def conv1d_axes(model: nn.Module, input_shape: tuple[int, ...], hidden: tuple[int, ...]):
    t = input_shape[0]
    axes, positions = {}, {}
    prev = None
    for i in range(len(hidden)):
        g = Axis(f"h{i}")
        axes[f"body.{2 * i}.weight"], axes[f"body.{2 * i}.bias"] = (g, prev), (g,)
        positions[f"body.{2 * i}.weight"] = t
        prev = g
    axes["head.weight"], axes["head.bias"] = (None, prev), (None,)
    positions["head.weight"] = 1
    return axes, positions


def gru_axes(model: nn.Module, input_shape: tuple[int, ...], hidden: tuple[int, ...]):
    t = input_shape[0]
    axes, positions = {}, {}
    prev = None
    for i in range(len(hidden)):
        g, g3 = Axis(f"h{i}"), Axis(f"h{i}", tile=3)
        p = f"rnns.{i}."
        axes[p + "weight_ih_l0"], axes[p + "weight_hh_l0"] = (g3, prev), (g3, g)
        axes[p + "bias_ih_l0"], axes[p + "bias_hh_l0"] = (g3,), (g3,)
        positions[p + "weight_ih_l0"] = positions[p + "weight_hh_l0"] = t
        prev = g
    axes["head.weight"], axes["head.bias"] = (None, prev), (None,)
    positions["head.weight"] = 1
    return axes, positions


def sequential_axes(model: nn.Sequential, input_shape: tuple[int, ...], hidden: tuple[int, ...] = ()):
    # One dry forward records each layer's output spatial size (FLOP positions, flatten factor).
    out_pos: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out_pos.__setitem__(n, o[0, 0].numel()))
             for n, m in model.named_children()]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    weighted = [n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))]
    axes, positions = {}, {}
    prev: Axis | None = None
    gi = 0
    last_pos = 1
    for n, m in model.named_children():
        if isinstance(m, nn.Flatten) and prev is not None:
            prev = Axis(prev.group, expand=last_pos)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            g = None if n == weighted[-1] else Axis(f"h{gi}")
            axes[f"{n}.weight"], axes[f"{n}.bias"] = (g, prev), (g,)
            positions[f"{n}.weight"] = out_pos[n]
            prev, gi = g, gi + (g is not None)
        last_pos = out_pos[n]
    return axes, positions


def layout_of(model: nn.Module) -> ModelLayout:
    """The Federated Dropout layout of a model made by `build_model`.

    Raises:
        ValueError: the model was not made by `build_model`.
    """
    arch = getattr(model, "fedray_arch", None)
    if arch is None:
        raise ValueError("layout_of needs a model made by fedray.workers.models.build_model")
    return model_layout(*arch)


def get_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every floating-point tensor of the state (parameters and buffers such
    as BatchNorm statistics), by name: what is federated. Integer buffers (BatchNorm's
    `num_batches_tracked`) stay each model's own."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def set_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Copy `params` into the model's state; tensors not in `params` (integer buffers) are kept."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in params or v.is_floating_point():
                v.copy_(params[k])


def num_params(params: Mapping[str, torch.Tensor]) -> int:
    return sum(int(v.numel()) for v in params.values())
