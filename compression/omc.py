"""OMC (online model compression): parameters held quantized, decompressed only while used.

`OMCModel` wraps a model from `workers.models`: each quantized weight lives as bit-packed codes
plus a per-variable (alpha, beta) transform (`QuantizedParam`). Linear and Conv layers run
through custom autograd functions that dequantize the weight block by block into one reused
workspace inside forward, and again inside backward for the input gradient only, so at most one
block is held in fp32 and nothing fp32 of the weight is saved for backward (8-bit Linear: blocks
of input columns straight from the codes, `omc_linear`; otherwise output rows or channels). The
weight gradient is dense fp32 (as any gradient); `step` applies SGD and re-quantizes with a
freshly fitted transform, 16-bit stochastic rounding (`omc_kernels`: fused numba kernels, one
call per variable or, for a small model, one for all its 8-bit variables; torch blocks without
numba). Embedding tables and LSTM / GRU / RNN weights are held quantized too (`omc_layers`);
Embedding steps touch only the rows looked up.

Wire format of one quantized variable (codec "omc"): alpha and beta as float32, then
ceil(n * bits / 8) bytes of little-endian packed codes.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedray.config import OMCConfig

from .codec import Codec, CodecContext, get_codec, register_codec
from .omc_kernels import FlatStep, Rounder, Workspace, dequantize_into, update_range
from .omc_linear import CodesLinear
from .omc_layers import QEmbedding, RNNWeights, embedding_ok
from .payload import Payload, PayloadError, param

__all__ = [
    "OMCCodec",
    "OMCConfig",
    "OMCModel",
    "QuantizedParam",
    "decode_params",
    "dequantize",
    "encode_params",
    "quantizable_names",
    "quantize",
    "stored_form",
]

_FORMATS = ("int", "float")
_FLAT_MAX = 1 << 22  # the most 8-bit values stepped as one flat array (16 MiB of flat gradient)

# --- the number formats (pure functions) --------------------------------------------------------

def _float_consts(bits: int, e: int) -> tuple[int, int, float]:
    m = bits - 1 - e
    bias = 2 ** (e - 1) - 1
    emin, emax = 1 - bias, 2 ** e - 1 - bias
    return m, emin, (2 ** (m + 1) - 1) * 2.0 ** (emax - m)


def fit_transform(vmin: float, vmax: float, *, bits: int, fmt: str = "int", exp_bits: int = 5) -> tuple[float, float]:
    """(alpha, beta) mapping [vmin, vmax] onto the format's range: v = alpha * v' + beta."""
    if fmt == "int":
        alpha, beta = (vmax - vmin) / (2 ** bits - 1), vmin
    else:
        alpha, beta = (vmax - vmin) / 2 / _float_consts(bits, exp_bits)[2], (vmax + vmin) / 2
    alpha = float(np.float32(alpha))
    return (alpha if alpha > 0 and math.isfinite(alpha) else 1.0), float(np.float32(beta))


def quantize(w: torch.Tensor, alpha: float, beta: float, *, bits: int, fmt: str = "int", exp_bits: int = 5,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes (int32, same shape) of `w`; stochastic rounding when `generator` is given."""
    u = (w.detach().to(torch.float32) - beta) / alpha
    noise = (lambda t: torch.rand(t.shape, generator=generator)) if generator is not None else None
    if fmt == "int":
        c = torch.floor(u + noise(u)) if noise else torch.round(u)
        return c.clamp_(0, 2 ** bits - 1).to(torch.int32)
    m, emin, maxf = _float_consts(bits, exp_bits)
    a = u.abs().clamp_(max=maxf)
    _, ex = torch.frexp(a)
    quantum = _pow2((ex - 1).clamp(min=emin) - m)
    q = a / quantum
    mag = ((torch.floor(q + noise(q)) if noise else torch.round(q)) * quantum).clamp_(max=maxf)
    _, ex2 = torch.frexp(mag)
    e2 = (ex2 - 1).clamp(min=emin)
    code = (e2 - emin) * 2 ** m + (mag / _pow2(e2 - m)).to(torch.int32)
    sub = mag < 2.0 ** emin
    code = torch.where(sub, (mag / 2.0 ** (emin - m)).to(torch.int32), code)
    return code + (u < 0).to(torch.int32) * (1 << (bits - 1)) * (mag > 0).to(torch.int32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e exactly, float32, for an integer tensor `e`."""
    return torch.ldexp(torch.ones(e.shape), e)


def dequantize(codes: torch.Tensor, alpha: float, beta: float, *, bits: int, fmt: str = "int", exp_bits: int = 5) -> torch.Tensor:
    """float32 values of `codes` (inverse of `quantize`)."""
    c = codes.to(torch.int32)
    if fmt == "int":
        return c.to(torch.float32) * alpha + beta
    m, emin, _ = _float_consts(bits, exp_bits)
    sign = 1.0 - 2.0 * ((c >> (bits - 1)) & 1).to(torch.float32)
    mag_code = c & ((1 << (bits - 1)) - 1)
    ef, mant = mag_code >> m, (mag_code & ((1 << m) - 1)).to(torch.float32)
    mag = torch.where(ef == 0, mant * 2.0 ** (emin - m), (mant + 2 ** m) * _pow2(ef - 1 + emin - m))
    return sign * mag * alpha + beta


def stored_form(tensors: Mapping[str, torch.Tensor], *, bits: int, per_variable: bool = True, fmt: str = "int",
                exp_bits: int = 5) -> dict[str, torch.Tensor]:
    """The float32 values `tensors` take once stored as OMC codes (round to nearest): each with
    its own (alpha, beta) fitted to its range, or with one fitted to the range of them all
    (`per_variable=False`, as `OMCConfig.per_variable` off)."""
    rng = {k: (float(t.detach().min()), float(t.detach().max())) for k, t in tensors.items() if t.numel()}
    if not rng:
        return {k: t.detach().to(torch.float32).clone() for k, t in tensors.items()}
    shared = fit_transform(min(lo for lo, _ in rng.values()), max(hi for _, hi in rng.values()), bits=bits,
                           fmt=fmt, exp_bits=exp_bits)
    out = {}
    for k, t in tensors.items():
        ab = fit_transform(*rng[k], bits=bits, fmt=fmt, exp_bits=exp_bits) if per_variable and k in rng else shared
        kw = {"bits": bits, "fmt": fmt, "exp_bits": exp_bits}
        out[k] = dequantize(quantize(t, *ab, **kw), *ab, **kw).reshape(t.shape)
    return out


# --- bit packing (little-endian bit order, code i at bits [i*b, (i+1)*b)) ----------------------

def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = np.ascontiguousarray(codes, dtype=np.int64).reshape(-1)
    if bits == 8:
        return codes.astype(np.uint8)
    if bits == 16:
        return codes.astype("<u2").view(np.uint8)
    if bits == 4:
        c = np.zeros(len(codes) + (len(codes) & 1), dtype=np.uint8)
        c[: len(codes)] = codes
        return c[0::2] | (c[1::2] << 4)
    planes = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def _unpack(buf: np.ndarray, bits: int, start: int, stop: int) -> np.ndarray:
    """Codes start..stop-1 as int32."""
    if bits == 8:
        return buf[start:stop].astype(np.int32)
    if bits == 16:
        return buf[2 * start : 2 * stop].view("<u2").astype(np.int32)
    if bits == 4:
        b = buf[start // 2 : -(-stop // 2)]
        nib = np.empty(2 * len(b), dtype=np.int32)
        nib[0::2], nib[1::2] = b & 15, b >> 4
        off = start & 1
        return nib[off : off + stop - start]
    b0, b1 = start * bits // 8, -(-stop * bits // 8)
    planes = np.unpackbits(buf[b0:b1], bitorder="little")
    skip = start * bits - 8 * b0
    planes = planes[skip : skip + (stop - start) * bits].reshape(-1, bits).astype(np.int32)
    return planes @ (1 << np.arange(bits, dtype=np.int32))


def _packed_nbytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


# --- stored variables ---------------------------------------------------------------------------

class _Transient:
    """Live bytes of decompressed fp32 parameter blocks, tracked through their lifetimes."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.current -= n


class QuantizedParam:
    """One variable held as packed codes and an (alpha, beta) transform; mutable in place.

    `grad` is a dense fp32 gradient (Linear, Conv, recurrent weights); `sgrad` a list of
    (row ids, row gradients) from embedding lookups.
    """

    def __init__(self, shape: tuple[int, ...], cfg: OMCConfig, buf: np.ndarray, alpha: float, beta: float) -> None:
        self.shape, self.cfg = tuple(shape), cfg
        self.n = math.prod(self.shape)
        self.buf, self.alpha, self.beta = buf, alpha, beta
        self.grad: torch.Tensor | None = None
        self.sgrad: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gview: torch.Tensor | None = None  # where a layer writes `grad` (`omc_kernels.FlatStep`)

    @classmethod
    def from_tensor(cls, w: torch.Tensor, cfg: OMCConfig, *, generator: torch.Generator | None = None,
                    transform: tuple[float, float] | None = None) -> "QuantizedParam":
        w = w.detach().to(torch.float32)
        alpha, beta = transform or fit_transform(float(w.min()), float(w.max()), bits=cfg.bits, fmt=cfg.fmt, exp_bits=cfg.exp_bits)
        if generator is None and cfg.fmt == "int" and cfg.bits <= 8:  # round to nearest, 1M values at a time
            flat, n = w.reshape(-1), w.numel()
            codes, rnd, piece = np.empty(n, np.uint8), Rounder(None), 1 << 20
            for s in range(0, n, piece):
                rnd.quantize_into(flat[s : s + piece].clone(), beta, alpha, (1 << cfg.bits) - 1, codes[s : s + piece])
            return cls(tuple(w.shape), cfg, codes if cfg.bits == 8 else _pack(codes, cfg.bits), alpha, beta)
        codes = quantize(w, alpha, beta, bits=cfg.bits, fmt=cfg.fmt, exp_bits=cfg.exp_bits, generator=generator)
        return cls(tuple(w.shape), cfg, _pack(codes.numpy(), cfg.bits), alpha, beta)

    @property
    def row_numel(self) -> int:
        return self.n // self.shape[0] if self.shape and self.shape[0] else self.n

    @property
    def fast(self) -> bool:
        """Integer codes of 8 bits or fewer: the torch kernels of `omc_kernels` apply."""
        return self.cfg.fmt == "int" and self.cfg.bits <= 8

    def _codes(self, start: int, stop: int) -> torch.Tensor:
        if self.cfg.bits == 8:
            return torch.from_numpy(self.buf[start:stop])
        return torch.from_numpy(_unpack(self.buf, self.cfg.bits, start, stop))

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows (dim 0) r0..r1-1 decompressed to a new fp32 tensor."""
        return self.rows_into(r0, r1, torch.empty((r1 - r0) * self.row_numel)).reshape((r1 - r0,) + self.shape[1:])

    def rows_into(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows r0..r1-1 decompressed into `out` (flat float32 of (r1 - r0) * row_numel)."""
        rn, c = self.row_numel, self.cfg
        codes = self._codes(r0 * rn, r1 * rn)
        if c.fmt == "int":
            return dequantize_into(codes, self.alpha, self.beta, out)
        return out.copy_(dequantize(codes, self.alpha, self.beta, bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits).reshape(-1))

    def gather_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """fp32 rows `idx` (1-D int64) as a new (len(idx), row_numel) tensor."""
        rn = self.row_numel
        if self.cfg.bits == 8:
            codes = torch.from_numpy(self.buf).view(self.shape[0], rn).index_select(0, idx)
            return dequantize_into(codes, self.alpha, self.beta, torch.empty(idx.numel(), rn)) if self.cfg.fmt == "int" \
                else self._dequant_codes(codes)
        uniq, inv = torch.unique(idx, return_inverse=True)
        rows = torch.stack([self.rows(int(r), int(r) + 1).reshape(rn) for r in uniq]) if uniq.numel() else torch.empty(0, rn)
        return rows.index_select(0, inv)

    def _dequant_codes(self, codes: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return dequantize(codes, self.alpha, self.beta, bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits)

    def stored_bytes(self) -> int:
        return int(self.buf.nbytes) + 8

    def to_payload(self) -> Payload:
        head = np.array([self.alpha, self.beta], dtype=np.float32).view(np.uint8)
        return Payload("omc", 1, "float32", self.shape,
                       {"bits": self.cfg.bits, "fmt": self.cfg.fmt, "exp_bits": self.cfg.exp_bits},
                       np.concatenate([head, self.buf]))


def _block_rows(qp_shape: tuple[int, ...], block_bytes: int) -> int:
    row = 4 * (math.prod(qp_shape[1:]) if len(qp_shape) > 1 else 1)
    return max(1, block_bytes // max(row, 1))


def _auto_block_bytes(quantized_numel: int) -> int:
    """Default decompression block: 1/8 of the quantized weights' fp32 bytes, within
    [16 KiB, 4 MiB]: whole layers of small models at a few blocks, bounded on large ones."""
    return int(min(4 << 20, max(16 << 10, 4 * quantized_numel // 8)))


class _QOp(torch.autograd.Function):
    """y = op(x, W, b) with W decompressed block by block into the model's workspace (Linear:
    blocks of input columns, accumulated into y; Conv: blocks of output channels); backward
    re-decompresses only for the input gradient (the weight gradient needs no W)."""

    @staticmethod
    def forward(ctx, x, token, bias, mod):  # noqa: ANN001 - autograd signature
        y = mod.apply_op(x, bias)
        ctx.save_for_backward(x)
        ctx.mod, ctx.has_bias = mod, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001
        (x,) = ctx.saved_tensors
        mod = ctx.mod
        qp = mod.qweight
        gx, gw = mod.backward(x, gy, ctx.needs_input_grad[0])
        qp.grad = gw if qp.grad is None else qp.grad.add_(gw)
        gb = None
        if ctx.has_bias:
            gb = (gy if gy.dim() == 2 else gy.reshape(-1, gy.shape[-1])).sum(0) if mod.out_dim == -1 else gy.sum(dim=[d for d in range(gy.dim()) if d != 1])
        return gx, None, gb, None


# autograd's C entry point: Function.apply's Python wrapper only adds the functorch handling
# (checked in _QModule.forward) and costs a few microseconds a layer on a millisecond step
_qop_apply = super(torch.autograd.Function, _QOp).apply


def codes_ok(orig: nn.Module, qp: QuantizedParam) -> bool:
    """Whether a layer runs from its codes (`omc_linear.CodesLinear`): an 8-bit int Linear."""
    return isinstance(orig, nn.Linear) and qp.cfg.bits == 8 and qp.cfg.fmt == "int" and len(qp.shape) == 2 \
        and qp.shape[0] > 0


class _QModule(nn.Module):
    """Stand-in for a Linear / Conv1d / Conv2d whose weight is a `QuantizedParam`."""

    def __init__(self, orig: nn.Module, qweight: QuantizedParam, tracker: _Transient, block_bytes: int,
                 workspace: Workspace | None = None) -> None:
        super().__init__()
        self.qweight, self.tracker = qweight, tracker
        self.ws = workspace or Workspace(tracker)
        self.block_rows = _block_rows(qweight.shape, block_bytes)
        # Linear at 8-bit int codes (`omc_linear`): blocks of input columns of equal width (a
        # K-split keeps each GEMM as wide as the layer: 2.3x faster than blocks of output rows
        # on the Fashion-MNIST MLP).
        self.block_cols = 0
        self.codes = None
        if codes_ok(orig, qweight):
            rows, cols = qweight.shape
            n = -(-cols // max(1, block_bytes // (4 * rows)))
            self.block_cols = -(-cols // n)
            self.codes = CodesLinear(self.ws, self.block_cols)
        self.bias = orig.bias
        self.token = nn.Parameter(torch.zeros(()))  # makes autograd call backward even for the first layer
        self.linear = isinstance(orig, nn.Linear)
        self.out_dim = -1 if self.linear else 1
        if self.linear:
            self.op = F.linear
        else:
            one = isinstance(orig, nn.Conv1d)
            conv = F.conv1d if one else F.conv2d
            self._gi = torch.nn.grad.conv1d_input if one else torch.nn.grad.conv2d_input
            self._gw = torch.nn.grad.conv1d_weight if one else torch.nn.grad.conv2d_weight
            self._kw = dict(stride=orig.stride, padding=orig.padding, dilation=orig.dilation, groups=orig.groups)
            if orig.groups != 1 or isinstance(orig.padding, str):
                raise ValueError("OMC supports convolutions with groups=1 and numeric padding")
            self.op = lambda x, w, b: conv(x, w, b, **self._kw)

    qbias: QuantizedParam | None = None

    def apply_op(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, nb = self.qweight.shape[0], self.block_rows
        if self.codes:
            return self.codes.forward(self.qweight, x, bias)
        if nb >= rows:
            return self.op(x, self.weight_block(0, rows), bias)
        y = torch.cat([self.op(x, self.weight_block(r0, min(r0 + nb, rows)), None) for r0 in range(0, rows, nb)],
                      dim=self.out_dim)
        if bias is not None:
            y = y + (bias if self.out_dim == -1 else bias.reshape((1, -1) + (1,) * (y.dim() - 2)))
        return y

    def workspace_values(self) -> int:
        """The most float32 values this layer decompresses at once."""
        qp = self.qweight
        if self.codes:
            return qp.shape[0] * min(self.block_cols, qp.shape[1])
        return min(self.block_rows, qp.shape[0]) * qp.row_numel

    def weight_block(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1-1 of the weight, decompressed into the shared workspace (valid until the
        next call on any layer of the model)."""
        qp = self.qweight
        w = self.ws.get((r1 - r0) * qp.row_numel)
        return qp.rows_into(r0, r1, w).view((r1 - r0,) + qp.shape[1:])

    def backward(self, x: torch.Tensor, gy: torch.Tensor, need_gx: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        rows, nb = self.qweight.shape[0], self.block_rows
        if self.linear:
            g2 = gy if gy.dim() == 2 else gy.reshape(-1, gy.shape[-1])
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            qp = self.qweight
            gw = torch.mm(g2.t(), x2, out=qp.gview) if qp.grad is None and qp.gview is not None else g2.t().mm(x2)
            if not need_gx:
                return None, gw
            if self.codes:
                gx = self.codes.input_grad(qp, g2)
                return (gx if x.dim() == 2 else gx.reshape(x.shape)), gw
            if nb >= rows:
                return g2.mm(self.weight_block(0, rows)).reshape(x.shape), gw
            gx = torch.zeros(x2.shape)
            for r0 in range(0, rows, nb):
                r1 = min(r0 + nb, rows)
                gx.addmm_(g2[:, r0:r1], self.weight_block(r0, r1))
            return gx.reshape(x.shape), gw
        gw = self._gw(x, self.qweight.shape, gy, **self._kw)
        if not need_gx:
            return None, gw
        gx = None
        for r0 in range(0, rows, nb):
            r1 = min(r0 + nb, rows)
            part = self._gi(x.shape, self.weight_block(r0, r1), gy[:, r0:r1], **self._kw)
            gx = part if gx is None else gx.add_(part)
        return gx, gw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if self.qbias is not None:  # weights_only=False: the bias is decompressed too
            qb = self.qbias
            bias = self.tracker.track(qb.rows(0, qb.shape[0])).requires_grad_(True)
            bias.register_hook(lambda g, qb=qb: setattr(qb, "grad", g if qb.grad is None else qb.grad + g))
        if torch._C._are_functorch_transforms_active():
            return _QOp.apply(x, self.token, bias, self)
        return _qop_apply(x, self.token, bias, self)


_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def quantizable_names(model: nn.Module) -> list[str]:
    """Names of the weights OMC can hold quantized, in model order: Linear and Conv kernels
    (not the output projection inside nn.MultiheadAttention, which reads it directly), plain
    Embedding tables, and the input / hidden weights of LSTM, GRU and RNN layers."""
    names: list[str] = []
    inside_mha = {f"{n}.{c}".lstrip(".") for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for c, _ in m.named_children()}
    for n, m in model.named_modules():
        pre = f"{n}." if n else ""
        if (isinstance(m, _SUPPORTED) and n not in inside_mha) or embedding_ok(m):
            names.append(f"{pre}weight")
        elif isinstance(m, nn.RNNBase):
            names += [f"{pre}{w}" for w in m._flat_weights_names if w.startswith("weight_")]
    return names


def _pick_fp32(names: list[str], sizes: Mapping[str, int], fraction: float, seed: int) -> set[str]:
    if fraction <= 0:
        return set()
    budget = fraction * sum(sizes[n] for n in names)
    order = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 0x0C]).permutation(len(names))
    keep, used = set(), 0
    for i in order:
        if used + sizes[names[i]] <= budget:
            keep.add(names[i])
            used += sizes[names[i]]
    return keep


class OMCModel:
    """Holds `model`'s quantizable weights as `QuantizedParam`s, swapping its layers in place.

    `seed` (derived by the caller from job seed, round and client) drives the choice of fp32
    variables under partial quantization and the stochastic rounding. Call `backward` on the
    loss, then `step(lr)` (plain SGD: no optimizer state); `release()` writes fp32 weights back
    into the original layers and restores them.

    Raises:
        ValueError: a convolution OMC cannot run (groups != 1, string padding).
    """

    def __init__(self, model: nn.Module, cfg: OMCConfig, *, seed: int = 0) -> None:
        self.model, self.cfg = model, cfg
        self.tracker = _Transient()
        self._gen = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
        self._rounder = Rounder(seed if cfg.stochastic else None)
        self._names = list(model.state_dict())
        names = quantizable_names(model)
        sizes = {n: model.get_parameter(n).numel() for n in names}
        self.fp32_names = _pick_fp32(names, sizes, cfg.partial_fp32_fraction, seed)
        chosen = [n for n in names if n not in self.fp32_names]
        self.block_bytes = cfg.block_bytes or _auto_block_bytes(sum(sizes[n] for n in chosen))
        self.ws = Workspace(self.tracker, self.block_bytes // 4)
        tensors = {n: model.get_parameter(n) for n in chosen}
        if not cfg.weights_only:
            for n in chosen:
                mod = model.get_submodule(_mod_name(n))
                if isinstance(mod, _SUPPORTED) and mod.bias is not None:
                    tensors[f"{_mod_name(n)}.bias".lstrip(".")] = mod.bias
        shared = None
        if not cfg.per_variable and tensors:
            lo = min(float(t.detach().min()) for t in tensors.values())
            hi = max(float(t.detach().max()) for t in tensors.values())
            shared = fit_transform(lo, hi, bits=cfg.bits, fmt=cfg.fmt, exp_bits=cfg.exp_bits)
        self.q = {n: QuantizedParam.from_tensor(t, cfg, transform=shared) for n, t in tensors.items()}
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._rnn: list[RNNWeights] = []
        rnn: dict[str, dict[str, str]] = {}
        for name in chosen:
            mname = _mod_name(name)
            orig = model.get_submodule(mname)
            if isinstance(orig, nn.RNNBase):
                rnn.setdefault(mname, {})[name.rsplit(".", 1)[-1]] = name
                continue
            if isinstance(orig, nn.Embedding):
                qm = QEmbedding(orig, self.q[name])
            else:
                qm = _QModule(orig, self.q[name], self.tracker, self.block_bytes, self.ws)
                bname = f"{mname}.bias".lstrip(".")
                if bname in self.q:
                    qm.bias, qm.qbias = None, self.q[bname]
                    orig.bias = nn.Parameter(torch.empty(0))
            parent, attr = _parent(model, mname)
            self._swapped.append((parent, attr, orig))
            parent._modules[attr] = qm
            orig.weight = nn.Parameter(torch.empty(0))  # no fp32 copy is held while training
        for mname, attrs in rnn.items():
            self._rnn.append(RNNWeights(model.get_submodule(mname), attrs, self.q, self.tracker))
        # the workspace at its final size now: cached views of it stay valid
        need = [m.workspace_values() for m in model.modules() if isinstance(m, _QModule)]
        if need:
            self.ws.get(max(need))
        self._fp32 = [p for n, p in model.named_parameters() if not n.endswith("token")]
        self._tables = {n for n in chosen if isinstance(model.get_submodule(_mod_name(n)), QEmbedding)}
        self._flat: FlatStep | None | bool = None  # False: does not apply

    def fp32_parameters(self) -> list[nn.Parameter]:
        """Parameters held in fp32 (biases, fp32-kept weights, other layers' parameters)."""
        return list(self._fp32)

    def step(self, lr: float) -> None:
        """SGD step: fp32 parameters in place; each quantized variable that has a gradient is
        decompressed block by block, updated and re-quantized with a refitted transform
        (stochastic if configured). Embedding tables update and re-quantize only the rows
        looked up since the last step (see `_sparse_step`)."""
        with torch.no_grad():
            ps = [p for p in self._fp32 if p.grad is not None]
            if ps:
                torch._foreach_add_(ps, [p.grad for p in ps], alpha=-lr)
                for p in ps:
                    p.grad = None
            flat = self._flat_step()
            if flat is not None and flat.run(lr):
                done = set(map(id, flat.qps))
                qps = [qp for qp in self.q.values() if id(qp) not in done]
            else:
                qps = list(self.q.values())
            shared = None
            if not self.cfg.per_variable:
                for qp in self.q.values():
                    _densify(qp)
                shared = self._range(self.q.values(), lr)
            for qp in qps:
                if qp.sgrad:
                    self._sparse_step(qp, lr)
                elif qp.grad is not None or shared is not None:
                    self._requantize(qp, lr, shared)

    def _flat_step(self) -> FlatStep | None:
        """The flat step of a small model's 8-bit variables (not embedding tables: they step
        by rows), built at the first step and again after `load_payloads`; None where it does
        not apply (another format or width, a shared transform, over `_FLAT_MAX` values)."""
        if self._flat is None:
            c = self.cfg
            qps = [qp for n, qp in self.q.items() if n not in self._tables]
            ok = c.per_variable and c.fmt == "int" and c.bits == 8 and qps and sum(qp.n for qp in qps) <= _FLAT_MAX
            self._flat = FlatStep(qps, self._rounder, self.ws) if ok else False
        return self._flat or None

    def _blocks(self, qp: QuantizedParam) -> Iterable[tuple[int, int]]:
        nb = _block_rows(qp.shape, self.block_bytes)
        rows = qp.shape[0] if qp.shape else 1
        return [(r0, min(r0 + nb, rows)) for r0 in range(0, rows, nb)]

    def _updated(self, qp: QuantizedParam, r0: int, r1: int, lr: float) -> torch.Tensor:
        """Rows r0..r1-1 after the SGD update, flat fp32 in the workspace."""
        rn = qp.row_numel
        w = qp.rows_into(r0, r1, self.ws.get((r1 - r0) * rn))
        if qp.grad is not None:
            w.add_(qp.grad.reshape(-1)[r0 * rn : r1 * rn], alpha=-lr)
        return w

    def _range(self, qps: Iterable[QuantizedParam], lr: float) -> tuple[float, float]:
        # Pass 1 of 2: the range of the updated values, without holding a whole variable in fp32.
        lo, hi = math.inf, -math.inf
        for qp in qps:
            if qp.fast:
                umin, umax = update_range(_flat_codes(qp), _flat_grad(qp), -lr / qp.alpha, self.ws)
                lo, hi = min(lo, qp.alpha * umin + qp.beta), max(hi, qp.alpha * umax + qp.beta)
                continue
            for r0, r1 in self._blocks(qp):
                mn, mx = torch.aminmax(self._updated(qp, r0, r1, lr))
                lo, hi = min(lo, float(mn)), max(hi, float(mx))
        c = self.cfg
        return fit_transform(lo, hi, bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits)

    def _requantize(self, qp: QuantizedParam, lr: float, transform: tuple[float, float] | None) -> None:
        c = self.cfg
        if qp.grad is not None and not qp.grad.is_contiguous():  # e.g. LSTM gradients: flatten once
            qp.grad = qp.grad.contiguous()
        if qp.fast:  # fused: range, then codes rewritten in place (omc_kernels)
            codes, grad, k = _flat_codes(qp), _flat_grad(qp), -lr / qp.alpha
            if transform is None:
                umin, umax = update_range(codes, grad, k, self.ws)
                transform = fit_transform(qp.alpha * umin + qp.beta, qp.alpha * umax + qp.beta, bits=c.bits,
                                          fmt=c.fmt, exp_bits=c.exp_bits)
            alpha, beta = transform
            self._rounder.requantize(codes, grad, k, qp.alpha / alpha, (qp.beta - beta) / alpha, (1 << c.bits) - 1,
                                     self.ws)
            if c.bits != 8:
                qp.buf = _pack(codes, c.bits)
            qp.alpha, qp.beta, qp.grad = alpha, beta, None
            return
        transform = transform or self._range([qp], lr)
        gen = self._gen if c.stochastic else None
        codes = np.empty(qp.n, dtype=np.int32)  # bookkeeping; packed right below
        rn = qp.row_numel
        for r0, r1 in self._blocks(qp):
            w = self._updated(qp, r0, r1, lr)
            codes[r0 * rn : r1 * rn] = quantize(w, *transform, bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits,
                                                generator=gen).numpy()
        qp.buf, (qp.alpha, qp.beta), qp.grad = _pack(codes, c.bits), transform, None

    def _sparse_step(self, qp: QuantizedParam, lr: float) -> None:
        """Embedding rows: update the rows looked up and re-quantize them alone with the
        current transform; if an updated value leaves the transform's range, refit it over
        the old range and the new values and re-quantize the whole table."""
        c = self.cfg
        if not qp.fast:
            _densify(qp)
            self._requantize(qp, lr, None)
            return
        ids = torch.cat([i for i, _ in qp.sgrad])
        g = torch.cat([r for _, r in qp.sgrad])
        qp.sgrad = []
        rows, inv = torch.unique(ids, return_inverse=True)
        w = self.tracker.track(qp.gather_rows(rows))
        w.index_add_(0, inv, g, alpha=-lr)
        mn, mx = (float(v) for v in torch.aminmax(w))
        top = (1 << c.bits) - 1
        lo, hi = qp.beta, qp.beta + qp.alpha * top
        rn = qp.row_numel
        if mn >= lo and mx <= hi:
            new = np.empty(w.numel(), np.uint8)
            self._rounder.quantize_into(w.reshape(-1), qp.beta, qp.alpha, top, new)
            self._put_rows(qp, rows, torch.from_numpy(new).view(-1, rn))
            return
        transform = fit_transform(min(mn, lo), max(mx, hi), bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits)
        codes = qp.buf if c.bits == 8 else np.empty(qp.n, np.uint8)
        for r0, r1 in self._blocks(qp):
            blk = qp.rows_into(r0, r1, self.ws.get((r1 - r0) * rn)).view(r1 - r0, rn)
            sel = (rows >= r0) & (rows < r1)
            blk[rows[sel] - r0] = w[sel]
            self._rounder.quantize_into(blk.view(-1), transform[1], transform[0], top, codes[r0 * rn : r1 * rn])
        if c.bits != 8:
            qp.buf = _pack(codes, c.bits)
        qp.alpha, qp.beta = transform

    def _put_rows(self, qp: QuantizedParam, rows: torch.Tensor, codes: torch.Tensor) -> None:
        rn = qp.row_numel
        if qp.cfg.bits == 8:
            torch.from_numpy(qp.buf).view(-1, rn).index_copy_(0, rows, codes)
            return
        allc = _unpack(qp.buf, qp.cfg.bits, 0, qp.n).reshape(-1, rn)
        allc[rows.numpy()] = codes.numpy()
        qp.buf = _pack(allc, qp.cfg.bits)

    # -- accounting -----------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes of parameters held between operations: packed codes + 8 bytes of transform per
        quantized variable, plus every fp32 parameter."""
        q = sum(qp.stored_bytes() for qp in self.q.values())
        return q + sum(p.numel() * p.element_size() for p in self.fp32_parameters())

    def peak_transient_bytes(self) -> int:
        """The most bytes of decompressed fp32 parameter values alive at once, so far (the
        model's decompression workspace included for as long as it exists)."""
        return self.tracker.peak

    def param_memory_bytes(self) -> int:
        """Stored bytes plus the peak of simultaneously decompressed fp32 blocks."""
        return self.stored_bytes() + self.peak_transient_bytes()

    def scratch_bytes(self) -> int:
        """Random-bit scratch of stochastic rounding (not parameter values; reported apart)."""
        return self._rounder.scratch_bytes()

    # -- wire and hand-back ---------------------------------------------------------------------
    def _fp32_tensor(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name) if name in dict(self.model.named_parameters()) else self.model.get_buffer(name)

    def to_payloads(self) -> dict[str, Payload]:
        """Every tensor of the model, by its original name: "omc" payloads for the quantized
        ones (exactly their stored bytes), "identity" (fp32) for the rest."""
        ident = get_codec("identity")
        return {n: self.q[n].to_payload() if n in self.q else ident.encode(self._fp32_tensor(n)) for n in self._names}

    def load_payloads(self, payloads: Mapping[str, Payload]) -> None:
        """Take a downloaded model. An "omc" payload for a variable this client quantizes is
        adopted as its stored codes; everything else is decoded (and quantized if needed).

        Raises:
            PayloadError: a payload is malformed.
        """
        for name, p in payloads.items():
            if name in self.q:
                qp = _from_payload(p, self.cfg) if p.codec == "omc" else QuantizedParam.from_tensor(_decode_one(p), self.cfg)
                if qp.cfg != self.cfg:
                    qp = QuantizedParam.from_tensor(qp.rows(0, qp.shape[0]), self.cfg)
                self._rebind(name, qp)
            else:
                with torch.no_grad():
                    self._fp32_tensor(name).copy_(_decode_one(p).reshape(p.shape))

    def _rebind(self, name: str, qp: QuantizedParam) -> None:
        self.q[name] = qp
        self._flat = None  # rebuilt (with this variable's codes) at the next step
        mod = self.model.get_submodule(_mod_name(name))
        if isinstance(mod, nn.RNNBase):
            return  # looked up in self.q at every forward
        if name.endswith("weight"):
            mod.qweight = qp
        else:
            mod.qbias = qp

    def dequantized(self) -> dict[str, torch.Tensor]:
        """fp32 copies of every tensor, by the original model's names."""
        return {n: self.q[n].rows(0, self.q[n].shape[0]) if n in self.q else self._fp32_tensor(n).detach().clone()
                for n in self._names}

    def release(self) -> None:
        """Write fp32 weights back into the original layers and put them back in the model."""
        values = self.dequantized()
        for parent, attr, orig in self._swapped:
            parent._modules[attr] = orig
        for r in self._rnn:
            r.remove()
        for name in self.q:
            mname, attr = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(self.model.get_submodule(mname), attr, nn.Parameter(values[name]))
        self._swapped, self._rnn = [], []


def _flat_codes(qp: QuantizedParam) -> np.ndarray:
    """A fast variable's codes as a flat uint8 array: its buffer at 8 bits, else unpacked."""
    return qp.buf if qp.cfg.bits == 8 else _unpack(qp.buf, qp.cfg.bits, 0, qp.n).astype(np.uint8)


def _flat_grad(qp: QuantizedParam) -> torch.Tensor | None:
    return None if qp.grad is None else qp.grad.reshape(-1)


def _densify(qp: QuantizedParam) -> None:
    """Fold embedding row gradients into a dense gradient (for the shared-transform path)."""
    if qp.sgrad:
        g = torch.zeros(qp.shape[0], qp.row_numel)
        for i, r in qp.sgrad:
            g.index_add_(0, i, r)
        qp.grad = g if qp.grad is None else qp.grad.add_(g.reshape(qp.shape))
        qp.sgrad = []


def _mod_name(pname: str) -> str:
    return pname.rsplit(".", 1)[0] if "." in pname else ""


def _parent(model: nn.Module, mname: str) -> tuple[nn.Module, str]:
    if "." in mname:
        pname, attr = mname.rsplit(".", 1)
        return model.get_submodule(pname), attr
    return model, mname


# --- the wire codec -----------------------------------------------------------------------------

def _from_payload(p: Payload, cfg: OMCConfig | None = None) -> QuantizedParam:
    n = OMCCodec._check_static(p)
    bits = param(p, "bits", int, 1, 16)
    fmt = param(p, "fmt", str)
    if fmt not in _FORMATS:
        raise PayloadError(f"omc: fmt {fmt!r} is not one of {_FORMATS}")
    exp_bits = param(p, "exp_bits", int, 1, 16)
    pcfg = OMCConfig(bits=bits, fmt=fmt, exp_bits=exp_bits) if cfg is None or (cfg.bits, cfg.fmt, cfg.exp_bits) != (bits, fmt, exp_bits) else cfg
    raw = np.frombuffer(memoryview(p.data).cast("B"), dtype=np.uint8)
    want = 8 + _packed_nbytes(n, bits)
    if raw.size != want:
        raise PayloadError(f"omc: payload has {raw.size} bytes, expected {want}")
    alpha, beta = (float(v) for v in raw[:8].copy().view(np.float32))
    if not (math.isfinite(alpha) and math.isfinite(beta)) or alpha <= 0:
        raise PayloadError("omc: transform must be finite with alpha > 0")
    return QuantizedParam(p.shape, pcfg, raw[8:].copy(), alpha, beta)


def _decode_one(p: Payload) -> torch.Tensor:
    return get_codec(p.codec).decode(p)


@register_codec("omc")
class OMCCodec(Codec):
    """OMC's stored form on the wire: per-variable (alpha, beta) as float32 + packed codes.
    Round to nearest unless `stochastic` (then seeded by the context)."""

    def __init__(self, bits: int = 8, fmt: str = "int", exp_bits: int = 5, stochastic: bool = False) -> None:
        self.cfg = OMCConfig(bits=bits, fmt=fmt, exp_bits=exp_bits)
        self.stochastic = bool(stochastic)

    def config(self) -> dict[str, Any]:
        return {"bits": self.cfg.bits, "fmt": self.cfg.fmt, "exp_bits": self.cfg.exp_bits, "stochastic": self.stochastic}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        gen = ctx.torch_generator() if self.stochastic else None
        flat = x.detach().to(torch.float32)
        p = QuantizedParam.from_tensor(flat if flat.dim() else flat.reshape(1), self.cfg, generator=gen).to_payload()
        return self._payload(x, dict(p.params), p.data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        self._check(p)
        qp = _from_payload(p)
        n = qp.n
        codes = torch.from_numpy(_unpack(qp.buf, qp.cfg.bits, 0, n))
        c = qp.cfg
        out = dequantize(codes, qp.alpha, qp.beta, bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits)
        return out.reshape(p.shape).to(getattr(torch, p.dtype))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 8 + _packed_nbytes(math.prod(shape), self.cfg.bits)

    @staticmethod
    def _check_static(p: Payload) -> int:
        if p.codec != "omc":
            raise PayloadError(f"payload of codec {p.codec!r} given to codec 'omc'")
        from .payload import check_shape

        return check_shape(p)


def encode_params(params: Mapping[str, torch.Tensor], cfg: OMCConfig, *, quantized: Iterable[str],
                  seed: int = 0, stochastic: bool = False) -> dict[str, Payload]:
    """Server broadcast: the `quantized` tensors as "omc" payloads (per-variable transform,
    round to nearest unless `stochastic`), the others fp32 ("identity")."""
    qset = set(quantized)
    codec = OMCCodec(cfg.bits, cfg.fmt, cfg.exp_bits, stochastic)
    ident = get_codec("identity")
    return {k: codec.encode(v, CodecContext(seed=seed, key=k)) if k in qset else ident.encode(v) for k, v in params.items()}


def decode_params(payloads: Mapping[str, Payload]) -> dict[str, torch.Tensor]:
    """fp32 tensors of "omc" or other registered payloads (what the server averages).

    Raises:
        PayloadError: a payload is malformed.
    """
    return {k: _decode_one(p).reshape(p.shape) for k, p in payloads.items()}
