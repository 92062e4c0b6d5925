"""Faster CPU kernels for small convolutional classifiers: a oneDNN copy of the model for
evaluation, and channels_last convolution weights for training.

Both apply only to models they are known to be right for, chosen automatically: an
`nn.Sequential` on the CPU in float32 made of `Conv2d` (zero padding), `Linear`, `ReLU`,
`MaxPool2d`, `Flatten` and `Dropout` with at least one `Conv2d`, and optionally a leading
`Unflatten` that adds the channel axis (`build_model("cnn")` is one).
Any other model, or a torch without oneDNN, takes the plain path; so does an evaluation whose
oneDNN forward fails.

Why (measured on the Fashion-MNIST CNN conv5x5(32)-pool-conv5x5(64)-pool-fc(512), one thread,
CPU time; docs/performance.md): evaluating 10,000 images at batch 4,096 in the default NCHW
layout runs at ~40-50 GFLOP/s, its activations (400 MB a batch) far outside the caches; the same
images through oneDNN's blocked layout at batch 128 run at ~200 GFLOP/s. Training at batch 10 with
channels_last conv weights runs ~1.2x as fast as with NCHW weights.

`FEDRAY_CONV_KERNELS` (environment, read at each use) turns them off for measurements: `none`,
or a comma list of `eval`, `train` (default: both).
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch
from torch import nn

__all__ = ["EVAL_BATCH", "channels_last_training", "enabled", "fast_eval_model", "map_batches", "supports_conv_kernels"]

T = TypeVar("T")

EVAL_BATCH = 128  # images per oneDNN forward: its activations stay in the L2/L3 caches

_LAYERS = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout)


def enabled(what: str) -> bool:
    """Whether the `what` ("eval" or "train") kernels are on (`FEDRAY_CONV_KERNELS`)."""
    v = os.environ.get("FEDRAY_CONV_KERNELS", "eval,train").strip().lower()
    return v not in ("none", "0", "off") and what in {p.strip() for p in v.split(",")}


def supports_conv_kernels(model: nn.Module) -> bool:
    """Whether `model` is a CPU float32 `nn.Sequential` of the layers these kernels handle, with
    at least one 2-d convolution."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return False
    body = list(model)[1:] if type(model[0]) is nn.Unflatten else list(model)
    if not body or not all(type(m) in _LAYERS for m in body):  # exact types: a subclass may change forward
        return False
    if not any(isinstance(m, nn.Conv2d) for m in model):
        return False
    for m in model:
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            return False
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            return False
        if isinstance(m, nn.MaxPool2d) and (m.return_indices or m.ceil_mode):
            return False
    params = list(model.parameters())
    return bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def fast_eval_model(model: nn.Module):
    """A oneDNN copy of `model` with its current weights, for evaluation: call it on a dense
    float32 NCHW batch, get dense logits. None where it does not apply (see the module
    docstring). The copy does not follow later changes of `model`'s weights."""
    if not enabled("eval") or not torch.backends.mkldnn.is_available() or not supports_conv_kernels(model):
        return None
    from torch.utils.mkldnn import MkldnnConv2d, MkldnnLinear

    prefix = model[0] if type(model[0]) is nn.Unflatten else None
    layers = []
    with torch.no_grad():
        for m in list(model)[1 if prefix is not None else 0 :]:
            if isinstance(m, nn.Conv2d):
                layers.append(MkldnnConv2d(m, torch.float32))
            elif isinstance(m, nn.Linear):
                layers.append(MkldnnLinear(m, torch.float32))
            elif isinstance(m, nn.Dropout):
                continue  # evaluation: the identity
            else:
                layers.append(copy.copy(m))
    net = nn.Sequential(*layers).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if prefix is not None:
            x = prefix(x)
        return net(x.contiguous().to_mkldnn()).to_dense()

    return forward


def channels_last_training(model: nn.Module) -> nn.Module:
    """`model` with its conv weights in channels_last (in place) where that applies; the model
    unchanged otherwise. Its `state_dict()` tensors then keep that layout: callers that need
    flat memory take `.contiguous()`."""
    if enabled("train") and supports_conv_kernels(model):
        model.to(memory_format=torch.channels_last)
    return model


def map_batches(fn: Callable[[int, int], T], n: int, batch: int, threads: int) -> list[T]:
    """`fn(start, stop)` for each batch of `range(n)`, in order, on `threads` Python threads that
    each run torch with one intra-op thread (restored after).

    Independent batches on separate threads need no barrier, unlike one batch split over
    OpenMP threads: on a loaded machine those spin at every barrier while a sibling thread waits
    for a core (10,000 test images of the efficiency task under load 15-20 on 2 cores: 8-9 s
    with one thread, 31-39 s with two OpenMP threads; docs/performance.md)."""
    spans = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    if threads <= 1 or len(spans) <= 1:
        return [fn(i, j) for i, j in spans]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(spans))) as ex:
            return list(ex.map(lambda s: fn(*s), spans))
    finally:
        torch.set_num_threads(prev)
