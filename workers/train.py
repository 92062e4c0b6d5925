"""Local training of one client: plain torch, no Ray, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from fedray.compression.fd import apply_mask
from fedray.compression.omc import OMCConfig, OMCModel
from fedray.config import TrainConfig

from .conv_kernels import EVAL_BATCH, fast_eval_model, map_batches

__all__ = ["TrainConfig", "TrainStats", "evaluate", "evaluate_dataset", "pick_device", "train_dataset", "train_local"]


@dataclass(frozen=True)
class TrainStats:
    loss: float
    steps: int
    examples: int
    param_memory_bytes: int = 0  # OMC only: stored bytes + peak transient decompressed bytes
    stored_param_bytes: int = 0  # OMC only: stored bytes at the end of training


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, scale: float | None, shift: float, cfg: TrainConfig, seed: int,
                *, omc: OMCConfig | OMCModel | None = None, prox_mu: float = 0.0,
                mask: Mapping[str, torch.Tensor] | None = None) -> TrainStats:
    """Train `model` in place for `cfg.local_epochs` epochs of minibatch SGD on (x, y).

    `x` may be uint8: it is converted once to float32 as `x * scale + shift`.
    The batch order comes from `seed` alone.

    Options (keyword-only):
        omc: train with OMC-compressed parameters. An `OMCConfig` wraps `model` for this call
            (seeded by `seed`) and writes fp32 weights back at the end; an `OMCModel` (whose
            `.model` must be `model`) is trained and left compressed, for `to_payloads()`.
        prox_mu: FedProx: adds mu/2 * ||w - w_start||^2, w_start the weights at the call.
        mask: pruning keep-masks by parameter name, re-applied after every step (and once first).

    Raises:
        ValueError: omc combined with momentum, prox_mu or mask; or prox_mu < 0.
    """
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    if omc is not None and (cfg.momentum or prox_mu or mask):
        raise ValueError("OMC training is plain SGD: it cannot be combined with momentum, prox_mu or mask")
    device = _device_of(model)  # the client's examples go where the model is (a GPU actor: cuda)
    xt = torch.from_numpy(_features(x, scale, shift)).to(device)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
    n = len(yt)
    g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)  # batch order on the CPU: the same on any device
    om = OMCModel(model, omc, seed=seed) if isinstance(omc, OMCConfig) else omc
    if om is not None and om.model is not model:
        raise ValueError("train_local: the OMCModel given wraps a different model")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum) if om is None else None
    params = dict(model.named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()} if prox_mu else None
    if mask:
        apply_mask(params, mask)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = loss_fn(model(xt[idx]), yt[idx])
            if start is not None:
                loss = loss + prox_mu / 2 * sum(((p - start[k]) ** 2).sum() for k, p in params.items())
            if om is None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if mask:
                    apply_mask(params, mask)
            else:
                loss.backward()
                om.step(cfg.lr)
            total += float(loss.detach())
            steps += 1
    mem = (om.param_memory_bytes(), om.stored_bytes()) if om is not None else (0, 0)
    if isinstance(omc, OMCConfig):
        om.release()
    return TrainStats(total / max(steps, 1), steps, n, *mem)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, scale: float | None, shift: float = 0.0, batch: int = 4096) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of `model` on (x, y).

    A CPU convolutional classifier that `conv_kernels.fast_eval_model` handles is evaluated by
    its oneDNN copy at `conv_kernels.EVAL_BATCH` images a batch, batches spread over
    `torch.get_num_threads()` threads of one intra-op thread each (`conv_kernels.map_batches`);
    the plain path if that fails."""
    model.eval()
    fast = fast_eval_model(model)
    if fast is not None:
        try:
            rows = map_batches(lambda i, j: _batch_metrics(fast, x, y, scale, shift, i, j, torch.device("cpu")),
                               len(y), min(batch, EVAL_BATCH), torch.get_num_threads())
            return sum(c for c, _ in rows) / max(len(y), 1), sum(s for _, s in rows) / max(len(y), 1)
        except RuntimeError:  # a oneDNN build that refuses an op: the plain path below
            pass
    device = _device_of(model)
    rows = [_batch_metrics(model, x, y, scale, shift, i, i + batch, device) for i in range(0, len(y), batch)]
    return sum(c for c, _ in rows) / max(len(y), 1), sum(s for _, s in rows) / max(len(y), 1)


def _batch_metrics(forward, x, y, scale, shift, i: int, j: int, device: torch.device) -> tuple[int, float]:
    """(correct predictions, summed cross-entropy) of examples i:j."""
    with torch.no_grad():  # grad mode is per thread: map_batches' threads need it too
        xb = torch.from_numpy(_features(x[i:j], scale, shift)).to(device)
        yb = torch.from_numpy(np.asarray(y[i:j], dtype=np.int64)).to(device)
        out = forward(xb)
        return int((out.argmax(1) == yb).sum()), float(nn.functional.cross_entropy(out, yb, reduction="sum"))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def pick_device(want: str = "auto") -> torch.device:
    """The device a worker trains on: "auto" is CUDA when Ray assigned this process a GPU (the
    job asked for `resources.gpus_per_worker`) and torch sees one, else the CPU.

    Raises:
        ValueError: "cuda" asked for but torch sees no CUDA device, or an unknown name.
    """
    if want == "cpu":
        return torch.device("cpu")
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("resources.device is cuda but torch sees no CUDA device (install a CUDA build of torch)")
        return torch.device("cuda")
    if want != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, got {want!r}")
    try:
        import ray

        assigned = bool(ray.is_initialized() and ray.get_gpu_ids())
    except Exception:  # outside a Ray worker
        assigned = False
    return torch.device("cuda") if assigned and torch.cuda.is_available() else torch.device("cpu")


def _features(x: np.ndarray, scale: float | None, shift: float) -> np.ndarray:
    """Model inputs from stored features: `x * scale + shift` in float32; `scale=None` keeps x
    as stored (integer token ids stay int64; float64 becomes float32)."""
    if scale is None:
        x = np.asarray(x)
        if x.dtype == np.float64:
            return x.astype(np.float32)
        return x.astype(np.int64) if x.dtype.kind in "iub" else x
    out = np.asarray(x, dtype=np.float32) * np.float32(scale)
    out += np.float32(shift)
    return out


def train_dataset(model: nn.Module, data, ctx) -> dict:
    """`Task.train`'s default: `train_local` on the examples of `data` (a map-style Dataset of
    (input, target) pairs) with the job's settings from `ctx` (a `fedray.TrainContext`).

    Returns {"loss", "examples", "steps"}.
    """
    from .data import as_arrays

    x, y, scale, shift = as_arrays(data)
    cfg = TrainConfig(local_epochs=ctx.local_epochs, batch_size=ctx.batch_size, lr=ctx.lr, momentum=ctx.momentum)
    st = train_local(model, x, y, scale, shift, cfg, ctx.seed, prox_mu=ctx.prox_mu, mask=ctx.mask)
    return {"loss": st.loss, "examples": st.examples, "steps": st.steps}


@torch.no_grad()
def evaluate_dataset(model: nn.Module, data, batch: int = 4096) -> dict[str, float]:
    """`Task.evaluate`'s default: {"accuracy", "loss"} (mean cross-entropy) of a classifier on
    `data`; an `ArrayDataset` is read in slices, any other Dataset through a DataLoader."""
    from .data import ArrayDataset

    if isinstance(data, ArrayDataset):
        acc, loss = evaluate(model, data.x, data.y, data.scale, data.shift, batch)
        return {"accuracy": acc, "loss": loss}
    model.eval()
    device = _device_of(model)
    correct, loss_sum, n = 0, 0.0, 0
    for xb, yb in torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False):
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
        n += len(yb)
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}
