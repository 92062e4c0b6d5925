"""Batched multi-client training: B clients that share a model shape train together as one
computation (`torch.func.vmap` over stacked parameters), with the same result as training them
one by one with `workers.train.train_local`.

Each client keeps its own batch order (its own `torch.Generator` seeded like `train_local`), its
own learning-rate step and its own momentum buffer. Clients hold different numbers of examples:
every step gathers one batch per client, padded to `batch_size` and masked, so each client's loss
is the mean cross-entropy over exactly its own batch. A client whose batches are used up is frozen
(no update, momentum untouched) while the others go on.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .train import TrainConfig, TrainStats, _features  # _features: the same inputs on both paths

__all__ = ["BatchedTrainingError", "batching_pays", "population_pad", "supports_batched", "train_batched",
           "train_batched_stacked"]


class BatchedTrainingError(RuntimeError):
    """The model cannot be trained batched (an op without a vmap rule); train one by one."""


def supports_batched(model: nn.Module) -> bool:
    """Whether `model` can go through `train_batched` (no buffers such as BatchNorm statistics,
    no recurrent layers, whose kernels have no vmap batching rule)."""
    if any(True for _ in model.buffers()):
        return False
    return not any(isinstance(m, nn.RNNBase) for m in model.modules())


def batching_pays(model: nn.Module) -> bool:
    """Whether training clients batched is faster than one by one for `model` on the CPU: it can
    be batched (`supports_batched`) and has no 2-d convolution.

    A 2-d convolution at a client's batch size is already compute-bound on the CPU: on the
    Fashion-MNIST CNN (conv5x5(32)-pool-conv5x5(64)-pool-fc(512), batch 10, 13 clients of 60
    images) one by one took 5.5-9.2 s, vmapped 13.7-16.0 s, and a hand-built graph of grouped
    convolutions (groups = clients) as slow; conv2's forward and backward alone cost the same
    separately, grouped, or with one shared weight, and im2col + bmm with per-client weights runs
    at an eighth of the per-client rate (benchmarks/conv_levers.py; docs/performance.md). Conv
    nets get their speed from `conv_kernels` instead. Batching wins where per-step overhead
    dominates (MLPs: 4-7x)."""
    if not supports_batched(model):
        return False
    return not any(isinstance(m, nn.Conv2d) for m in model.modules())


def train_batched(
    model_template: nn.Module, start_params: Mapping[str, torch.Tensor], xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray], cfg: TrainConfig, seeds: Sequence[int], scale: float, shift: float = 0.0,
) -> list[tuple[dict[str, torch.Tensor], TrainStats]]:
    """Train `len(xs)` clients and return each one's (parameters, stats); see `train_batched_stacked`."""
    params, stats = train_batched_stacked(model_template, start_params, xs, ys, cfg, seeds, scale, shift)
    return [({k: v[i].clone() for k, v in params.items()}, st) for i, st in enumerate(stats)]


def train_batched_stacked(
    model_template: nn.Module, start_params: Mapping[str, torch.Tensor], xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray], cfg: TrainConfig, seeds: Sequence[int], scale: float, shift: float = 0.0,
    pad_to: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[TrainStats]]:
    """Train `len(xs)` clients from the same `start_params`, each on its own (x, y) with its own
    seed; return their final parameters stacked (float32, by name, client i at index i) and
    each client's stats.

    Every client's batches are padded (and masked) to one width: the batch size, or `pad_to`
    when all clients fit one batch of `pad_to` examples. Pass the largest client of the whole
    population as `pad_to` (`population_pad`): a job whose clients hold 1-2 examples then
    computes 2-wide batches instead of 32-wide ones, and the width, fixed per job, keeps a
    client's update bit-identical whatever batch it trains in.

    Equal, within float tolerance, to `set_params(model, start); train_local(model, x, y, scale,
    shift, cfg, seed)` per client. `model_template` is only read (its structure); its parameters
    are left alone.

    Raises:
        ValueError: `xs`, `ys` and `seeds` differ in length, or a client's x and y do.
        BatchedTrainingError: the model cannot be vmapped (see `supports_batched`).
    """
    b = len(xs)
    if len(ys) != b or len(seeds) != b:
        raise ValueError(f"xs, ys and seeds must have one entry per client, got {b}, {len(ys)}, {len(seeds)}")
    if b == 0:
        return {k: v.detach().to(torch.float32).unsqueeze(0)[:0] for k, v in start_params.items()}, []
    if not supports_batched(model_template):
        raise BatchedTrainingError(f"{type(model_template).__name__} has buffers or recurrent layers; use train_local")
    sizes = [len(y) for y in ys]
    for i, (x, n) in enumerate(zip(xs, sizes)):
        if len(x) != n:
            raise ValueError(f"client {i}: {len(x)} features but {n} labels")
    bs = cfg.batch_size
    x_all = torch.from_numpy(_features(np.concatenate(xs), scale, shift))
    y_all = torch.from_numpy(np.concatenate(ys).astype(np.int64, copy=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])

    names = list(start_params)
    params = {k: start_params[k].detach().to(torch.float32).unsqueeze(0).repeat(b, *[1] * start_params[k].dim())
              for k in names}
    bufs: dict[str, torch.Tensor] | None = None
    step_fn = _mlp_step_fn(model_template) or _step_fn(model_template)
    loss_sum = torch.zeros(b, dtype=torch.float64)
    steps = torch.zeros(b, dtype=torch.int64)
    gens: list = list(seeds)  # each client's generator, made where it first draws (_epoch_batches)

    for _ in range(cfg.local_epochs):
        gidx, mask, count = _epoch_batches(gens, sizes, offsets, bs, pad_to)
        for s in range(gidx.shape[1]):
            active = count[:, s] > 0
            xb, yb, m, c = x_all[gidx[:, s]], y_all[gidx[:, s]], mask[:, s], count[:, s].clamp(min=1)
            grads, loss = step_fn(params, xb, yb, m, c)
            all_active = bool(active.all())
            with torch.no_grad():
                if cfg.momentum > 0:
                    if bufs is None:  # the first step: every client has at least one batch, or is empty
                        bufs = {k: g.clone() for k, g in grads.items()}
                    else:
                        for k in names:
                            upd = bufs[k] * cfg.momentum + grads[k]
                            bufs[k] = upd if all_active else torch.where(_bcast(active, upd), upd, bufs[k])
                    grads = bufs
                for k in names:
                    new = params[k] - cfg.lr * grads[k]
                    params[k] = new if all_active else torch.where(_bcast(active, new), new, params[k])
                loss_sum += torch.where(active, loss.double(), 0.0)
                steps += active.long()
    losses, counts = loss_sum.tolist(), steps.tolist()
    return params, [TrainStats(losses[i] / max(counts[i], 1), counts[i], sizes[i]) for i in range(b)]


def _step_fn(model: nn.Module):
    """Per-client (grads, loss) of one masked batch, vmapped over the client axis."""

    def loss_of(p, x, y, m, c):
        out = functional_call(model, p, (x,))
        ce = nn.functional.cross_entropy(out, y, reduction="none")
        return (ce * m).sum() / c

    return vmap(grad_and_value(loss_of), in_dims=(0, 0, 0, 0, 0))


def _mlp_step_fn(model: nn.Module):
    """For a `build_model("mlp", ...)` stack (Flatten, Linear, ReLU only): the same step with a
    hand-written backward over batched matmuls. The functorch path costs ~1 ms of dispatch per
    step whatever B is; this one a few dozen small kernels, which is what decides the speed of
    clients with one or two batches each. Returns None for any other model."""
    if not isinstance(model, nn.Sequential):
        return None
    plan: list[tuple[str, str | None]] = []  # ("linear", name) or ("relu", None)
    for name, m in model.named_children():
        if isinstance(m, nn.Linear) and m.bias is not None:
            plan.append(("linear", name))
        elif isinstance(m, nn.ReLU):
            plan.append(("relu", None))
        elif not isinstance(m, nn.Flatten):
            return None
    if not plan or plan[-1][0] != "linear":
        return None

    def step(p, x, y, m, c):
        h = x.reshape(x.shape[0], x.shape[1], -1)
        saved = []  # per op: its input (linear) or its output mask (relu)
        for kind, name in plan:
            if kind == "linear":
                saved.append(h)
                h = torch.baddbmm(p[name + ".bias"].unsqueeze(1), h, p[name + ".weight"].transpose(1, 2))
            else:
                h = torch.relu(h)
                saved.append(h > 0)
        logp = torch.log_softmax(h, dim=2)
        nll = -logp.gather(2, y.unsqueeze(2)).squeeze(2)  # [B, bs]
        w = m / c.unsqueeze(1)
        loss = (nll * w).sum(dim=1)
        dz = logp.exp()
        dz.scatter_add_(2, y.unsqueeze(2), torch.full_like(dz[..., :1], -1.0))
        dz *= w.unsqueeze(2)
        grads: dict[str, torch.Tensor] = {}
        for (kind, name), s in zip(reversed(plan), reversed(saved)):
            if kind == "linear":
                grads[name + ".weight"] = torch.bmm(dz.transpose(1, 2), s)
                grads[name + ".bias"] = dz.sum(dim=1)
                if s is not saved[0]:
                    dz = torch.bmm(dz, p[name + ".weight"])
            else:
                dz = dz * s
        return grads, loss

    return step


def population_pad(sizes, batch_size: int) -> int | None:
    """`pad_to` for `train_batched_stacked`: the largest client's size when it is below the
    batch size (every client then trains one batch of at most that many examples), else None.
    `sizes`: every client's number of examples (an array; None or a function of ids gives None)."""
    if sizes is None or callable(sizes) or len(sizes) == 0:
        return None
    top = int(np.max(sizes))
    return max(top, 1) if top < batch_size else None


def _epoch_batches(gens, sizes, offsets, bs, pad_to: int | None = None):
    """One epoch's batches: (global index [B, S, w], mask [B, S, w], valid count [B, S]), w the
    batch size, or `pad_to` where every client fits one batch of that many. `gens[i]`: client
    i's generator, or its seed until it first draws (replaced in place by the generator).

    Client i's batch j is `perm_i[j*bs:(j+1)*bs]` exactly as in `train_local`; a client that fits
    one batch has that batch whatever its permutation (all its examples: the same update, summed
    in another order), so it takes them in their order and its generator is never made. Padded
    slots point at the client's first example and have mask 0.
    """
    b = len(sizes)
    n_steps = max(math.ceil(n / bs) for n in sizes)
    permute_above = bs  # clients of more examples than one batch draw their epoch's order
    if n_steps == 1 and pad_to is not None and max(sizes) <= pad_to < bs:
        bs = pad_to
    width = n_steps * bs
    # numpy for the bookkeeping (torch's per-row indexing costs ~10 us a call, which is most of a
    # round for clients with one or two examples); torch only for the permutations themselves.
    slot, n_of = np.arange(width, dtype=np.int64), np.asarray(sizes, dtype=np.int64)[:, None]
    held = slot < n_of  # (b, width): the slots that hold an example
    gidx = np.asarray(offsets[:b], dtype=np.int64)[:, None] + np.where(held, slot, 0)
    mask = held.astype(np.float32)
    for i in np.flatnonzero(n_of[:, 0] > permute_above):
        n, g = int(n_of[i, 0]), gens[i]
        if not isinstance(g, torch.Generator):  # still its seed: made at its first draw
            g = gens[i] = torch.Generator().manual_seed(int(g) & 0x7FFFFFFFFFFFFFFF)
        gidx[i, :n] = offsets[i] + torch.randperm(n, generator=g).numpy()
    mask_t = torch.from_numpy(mask).view(b, n_steps, bs)
    return torch.from_numpy(gidx).view(b, n_steps, bs), mask_t, mask_t.sum(dim=2)


def _bcast(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return active.view(-1, *[1] * (like.dim() - 1))
