"""A frozen base held OMC-compressed, so that only a model's trainable tensors are federated
(adapter-only fine-tuning: LoRA on a quantized base, the QLoRA shape).

fedray federates a model's `state_dict` (its floating-point tensors). `freeze_base(model)`
takes every parameter that is not trainable out of it and keeps it as local, read-only state:

- `nn.Linear` weights become OMC's stored form (`omc.QuantizedParam`: packed integer codes and
  one (alpha, beta) transform per variable, round to nearest, so every process that builds the
  same base gets the same codes). `FrozenLinear` decompresses the weight while the layer runs
  and again in backward for the input gradient only; no fp32 copy outlives the call and no
  weight gradient is computed.
- `nn.Embedding` tables likewise (`FrozenEmbedding` decompresses only the rows looked up).
- Everything else that is frozen (biases, LayerNorm) becomes a non-persistent fp32 buffer.

Afterwards `model.state_dict()` and `model.parameters()` hold the trainable tensors alone: the
global model, the broadcast, every upload and the aggregation are adapter-only with no change
to the engine, the workers or the service. The base never leaves the process and no optimizer
sees it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from fedray.config import OMCConfig

from .omc import QuantizedParam

__all__ = ["FrozenBase", "FrozenEmbedding", "FrozenLinear", "base_digest", "freeze_base", "frozen_bytes"]


class _FrozenLinearOp(torch.autograd.Function):
    """y = x W^T + b with W decompressed for the call; backward gives the input gradient only."""

    @staticmethod
    def forward(ctx, x, mod):  # noqa: ANN001 - autograd signature
        ctx.mod = mod
        return F.linear(x, mod.weight_fp32(x), mod.bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001
        return gy @ ctx.mod.weight_fp32(gy), None


class FrozenLinear(nn.Module):
    """Stand-in for a frozen `nn.Linear`: the weight as a `QuantizedParam`, the bias (if any) as
    a non-persistent buffer; nothing in `state_dict`, no parameters."""

    def __init__(self, orig: nn.Linear, cfg: OMCConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = orig.in_features, orig.out_features
        self.qweight = QuantizedParam.from_tensor(orig.weight.detach(), cfg)
        _codes_buffer(self)
        self.register_buffer("bias", None if orig.bias is None else orig.bias.detach().clone(), persistent=False)

    def weight_fp32(self, like: torch.Tensor) -> torch.Tensor:
        qp = self.qweight
        return qp.rows(0, qp.shape[0]).to(device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinearOp.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.qweight.cfg.bits}"


class FrozenEmbedding(nn.Module):
    """Stand-in for a frozen `nn.Embedding` (plain lookups): rows decompressed on lookup."""

    def __init__(self, orig: nn.Embedding, cfg: OMCConfig) -> None:
        super().__init__()
        if orig.max_norm is not None:
            raise ValueError("freeze_base: an Embedding with max_norm renormalises its table; it cannot be frozen")
        self.num_embeddings, self.embedding_dim = orig.num_embeddings, orig.embedding_dim
        self.qweight = QuantizedParam.from_tensor(orig.weight.detach(), cfg)
        _codes_buffer(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.gather_rows(idx.reshape(-1).cpu())
        return rows.to(idx.device).reshape(tuple(idx.shape) + (self.embedding_dim,))


@dataclass(frozen=True)
class FrozenBase:
    """What `freeze_base` did: the frozen tensors' names and their bytes as stored and in fp32."""

    quantized: tuple[str, ...]
    fp32: tuple[str, ...]
    stored_bytes: int
    fp32_bytes: int


def freeze_base(model: nn.Module, *, trainable: Callable[[str, nn.Parameter], bool] | None = None,
                omc: OMCConfig | None = OMCConfig(bits=8)) -> FrozenBase:
    """Freeze every parameter of `model` that is not `trainable(name, param)` (default: those
    with `requires_grad`, as peft leaves them), in place. With `omc`, frozen Linear and
    Embedding weights are held in its stored form (bits, fmt); `omc=None` keeps them fp32 as
    non-persistent buffers.

    A module that mixes trainable and frozen parameters keeps its class; its frozen ones become
    buffers. The base must be the same in every process that builds the model (load it, or
    build it under a fixed seed): fedray never sends it.

    Raises:
        ValueError: nothing is left trainable, or `omc` is not an OMCConfig.
    """
    if omc is not None and not isinstance(omc, OMCConfig):
        raise ValueError(f"freeze_base: omc must be an OMCConfig or None, got {type(omc).__name__}")
    keep = trainable or (lambda _n, p: p.requires_grad)
    train_names = {n for n, p in model.named_parameters() if keep(n, p)}
    if not train_names:
        raise ValueError("freeze_base: no parameter is trainable; pass trainable= (e.g. LoRA's lora_ tensors)")
    quantized, fp32 = [], []
    stored = total = 0
    for name, mod in list(model.named_modules()):
        own = [(f"{name}.{k}" if name else k, p) for k, p in mod.named_parameters(recurse=False)]
        if not own or any(n in train_names for n, _ in own):
            continue
        if omc is not None and name and type(mod) in (nn.Linear, nn.Embedding):
            new = FrozenLinear(mod, omc) if isinstance(mod, nn.Linear) else FrozenEmbedding(mod, omc)
            _replace(model, name, new)
            quantized.append(f"{name}.weight")
            stored += new.qweight.stored_bytes() + (0 if getattr(new, "bias", None) is None else 4 * new.bias.numel())
            total += 4 * sum(p.numel() for _, p in own)
            fp32 += [n for n, _ in own if not n.endswith(".weight")]
    for name, p in list(model.named_parameters()):
        if name in train_names:
            continue
        mname, attr = name.rsplit(".", 1) if "." in name else ("", name)
        mod = model.get_submodule(mname)
        del mod._parameters[attr]
        mod.register_buffer(attr, p.detach().clone(), persistent=False)
        fp32.append(name)
        stored += 4 * p.numel()
        total += 4 * p.numel()
        if isinstance(mod, nn.RNNBase):
            mod._init_flat_weights()
    return FrozenBase(tuple(quantized), tuple(fp32), stored, total)


def base_digest(model: nn.Module) -> str:
    """SHA-256 of everything frozen in `model` (stored codes, transforms, fp32 buffers): equal
    before and after training when the base never changed."""
    h = hashlib.sha256()
    for name, mod in model.named_modules():
        if isinstance(mod, (FrozenLinear, FrozenEmbedding)):  # (peft layers forward getattr to their base)
            qp = mod.qweight
            h.update(name.encode())
            h.update(qp.buf.tobytes())
            h.update(torch.tensor([qp.alpha, qp.beta], dtype=torch.float64).numpy().tobytes())
        for bname, b in mod.named_buffers(recurse=False):
            if bname not in mod._non_persistent_buffers_set or b is None or bname == "codes":
                continue
            h.update(f"{name}.{bname}".encode())
            h.update(b.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def frozen_bytes(model: nn.Module) -> tuple[int, int]:
    """(stored, fp32) bytes of everything frozen in `model`: OMC codes and transforms plus fp32
    buffers as held, and the same tensors in fp32."""
    stored = fp32 = 0
    for mod in model.modules():
        if isinstance(mod, (FrozenLinear, FrozenEmbedding)):
            stored, fp32 = stored + mod.qweight.stored_bytes(), fp32 + 4 * mod.qweight.n
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and bname in mod._non_persistent_buffers_set and bname != "codes":
                n = b.numel() * b.element_size()
                stored, fp32 = stored + n, fp32 + n
    return stored, fp32


def _codes_buffer(mod: nn.Module) -> None:
    """The packed codes as a non-persistent uint8 buffer sharing `qweight`'s memory: the base is
    local state like any buffer (a model holding one is never trained vmapped, `workers/batched.py`)."""
    mod.register_buffer("codes", torch.from_numpy(mod.qweight.buf), persistent=False)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = (model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]) if "." in name else (model, name)
    setattr(parent, attr, new)
