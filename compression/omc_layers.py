"""OMC stand-ins for layers other than Linear / Conv: Embedding (rows decompressed on lookup,
sparse row gradients) and recurrent layers (LSTM, GRU, RNN: weights decompressed per forward).

- Embedding: the lookup gathers only the rows the batch uses from the packed codes and
  decompresses those (they are the layer's output, an activation, as with an fp32 table). The
  backward keeps (row ids, row gradients); `OMCModel.step` then updates and re-quantizes only
  those rows (see `omc.OMCModel._sparse_step`).
- LSTM / GRU / RNN: torch runs these through one fused kernel that reads the module's weight
  tensors, so a forward pre-hook decompresses each quantized weight into a fresh fp32 leaf
  tensor and hands it to the module; autograd keeps those tensors until the backward is done,
  and all of them are tracked as transient parameter memory for that whole time. A hook on
  each (after accumulation, no copy) moves its gradient to the stored variable's `grad`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QEmbedding", "RNNWeights", "embedding_ok"]


def embedding_ok(m: nn.Module) -> bool:
    """Whether OMC can hold this Embedding's table quantized (plain lookups only)."""
    return isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse


class _EmbOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, token, mod):  # noqa: ANN001 - autograd signature
        flat = idx.reshape(-1)
        out = mod.qweight.gather_rows(flat)
        ctx.save_for_backward(flat)
        ctx.mod = mod
        return out.reshape(tuple(idx.shape) + (out.shape[-1],))

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        (flat,) = ctx.saved_tensors
        mod = ctx.mod
        g = g.reshape(flat.numel(), -1)
        if mod.padding_idx is not None:
            g = g.masked_fill((flat == mod.padding_idx).unsqueeze(1), 0.0)
        mod.qweight.sgrad.append((flat, g))
        return None, None, None


class QEmbedding(nn.Module):
    """Stand-in for an nn.Embedding whose table is a `QuantizedParam`."""

    def __init__(self, orig: nn.Embedding, qweight) -> None:
        super().__init__()
        self.qweight = qweight
        self.padding_idx = orig.padding_idx
        self.token = nn.Parameter(torch.zeros(()))  # makes autograd call backward (indices need no grad)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _EmbOp.apply(idx, self.token, self)


class RNNWeights:
    """Decompresses a recurrent module's quantized weights before each forward.

    `q` maps the module's weight attribute names (e.g. "weight_hh_l0") to `QuantizedParam`s,
    looked up at every forward so that a rebound variable is seen.
    """

    def __init__(self, mod: nn.RNNBase, names: dict[str, str], q: dict, tracker) -> None:
        self.mod, self.names, self.q, self.tracker = mod, names, q, tracker
        for attr in names:
            del mod._parameters[attr]
            setattr(mod, attr, torch.empty(0))  # RNNBase.__setattr__ refreshes _flat_weights
        self.handles = [mod.register_forward_pre_hook(self._before), mod.register_forward_hook(self._after)]

    def _before(self, mod, args) -> None:  # noqa: ANN001
        for attr, full in self.names.items():
            qp = self.q[full]
            w = self.tracker.track(qp.rows(0, qp.shape[0])).requires_grad_(True)
            w.register_post_accumulate_grad_hook(lambda w, qp=qp: _take_grad(qp, w))
            setattr(mod, attr, w)

    def _after(self, mod, args, out) -> None:  # noqa: ANN001
        for attr in self.names:  # autograd holds the weights until backward; the module lets go
            setattr(mod, attr, torch.empty(0))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for attr in self.names:
            delattr(self.mod, attr)


def _take_grad(qp, w: torch.Tensor) -> None:
    """Move the gradient autograd accumulated on the decompressed copy to the stored variable."""
    g, w.grad = w.grad, None
    qp.grad = g if qp.grad is None else qp.grad.add_(g)
