"""Local training of one client: plain torch, no Ray, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["TrainConfig", "TrainStats", "evaluate", "train_local"]


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0


@dataclass(frozen=True)
class TrainStats:
    loss: float
    steps: int
    examples: int


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, scale: float, shift: float, cfg: TrainConfig, seed: int) -> TrainStats:
    """Train `model` in place for `cfg.local_epochs` epochs of minibatch SGD on (x, y).

    `x` may be uint8: it is converted once to float32 as `x * scale + shift`.
    The batch order comes from `seed` alone.
    """
    xt = torch.from_numpy(_features(x, scale, shift))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    n = len(yt)
    g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return TrainStats(total / max(steps, 1), steps, n)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, scale: float, shift: float = 0.0, batch: int = 4096) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of `model` on (x, y)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(y), batch):
        xb = torch.from_numpy(_features(x[i : i + batch], scale, shift))
        yb = torch.from_numpy(np.asarray(y[i : i + batch], dtype=np.int64))
        out = model(xb)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return correct / max(len(y), 1), loss_sum / max(len(y), 1)


def _features(x: np.ndarray, scale: float, shift: float) -> np.ndarray:
    out = np.asarray(x, dtype=np.float32) * np.float32(scale)
    out += np.float32(shift)
    return out
