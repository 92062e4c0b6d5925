"""Models clients train, and conversion between torch modules and named float32 tensors."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fedray.compression.fd import Axis, ModelLayout

__all__ = ["MODEL_KINDS", "build_model", "get_params", "layout_of", "model_layout", "num_params", "set_params"]

MODEL_KINDS = ("mlp", "cnn", "conv1d", "gru")


def build_model(kind: str, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> nn.Module:
    """Build a model.

    - `mlp`: flatten, then Linear+ReLU per hidden width, then a Linear head.
    - `cnn`: images (H, W) or (C, H, W), H and W divisible by 4; `hidden` = (c1, c2, fc):
      conv5x5(c1)-ReLU-maxpool2, conv5x5(c2)-ReLU-maxpool2, Linear(fc)-ReLU, Linear head.
    - `conv1d`: sequences (T, F); one conv3(width)-ReLU per hidden width over time, mean over
      time, Linear head.
    - `gru`: sequences (T, F), left zero-padded; one single-layer GRU per hidden width, Linear
      head on the last time step.

    Every hidden width can be changed independently, which is how a Federated Dropout sub-model
    is built (`fedray.compression.fd.submodel_hidden`).

    Raises:
        ValueError: unknown kind, or a shape the kind cannot take.
    """
    hidden = tuple(int(h) for h in hidden)
    input_shape = tuple(int(s) for s in input_shape)
    if kind == "mlp":
        model = _mlp(input_shape, num_classes, hidden)
    elif kind == "cnn":
        model = _cnn(input_shape, num_classes, hidden)
    elif kind in ("conv1d", "gru"):
        if len(input_shape) != 2 or not hidden:
            raise ValueError(f"{kind}: input_shape must be (T, F) and hidden non-empty, got {input_shape}, {hidden}")
        model = (_Conv1dNet if kind == "conv1d" else _GRUNet)(input_shape[1], num_classes, hidden)
    else:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")
    model.fedray_arch = (kind, input_shape, int(num_classes), hidden)
    return model


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    d_in = 1
    for s in input_shape:
        d_in *= int(s)
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU()]
        d_in = h
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Module:
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
    """The Federated Dropout layout of `build_model(kind, input_shape, num_classes, hidden)`:
    hidden group `h{i}` is hidden width i (units, filters or GRU hidden units).

    Raises:
        ValueError: as `build_model`.
    """
    model = build_model(kind, input_shape, num_classes, hidden)
    kind, input_shape, num_classes, hidden = model.fedray_arch
    groups = tuple((f"h{i}", h) for i, h in enumerate(hidden))
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    if kind in ("mlp", "cnn"):
        axes, positions = _sequential_axes(model, input_shape)
    elif kind == "conv1d":
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
    else:  # gru
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
    return ModelLayout(kind, tuple(input_shape), num_classes, groups,
                       tuple((k, tuple(axes[k])) for k, _ in shapes), shapes, tuple(positions.items()))


def _sequential_axes(model: nn.Sequential, input_shape: tuple[int, ...]):
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
