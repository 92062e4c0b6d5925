"""OMC (online model compression): parameters held quantized, decompressed only while used.

`OMCModel` wraps a model from `workers.models`: each quantized weight lives as bit-packed codes
plus a per-variable (alpha, beta) transform (`QuantizedParam`). Linear and Conv layers run
through custom autograd functions that dequantize the weight block by block (output rows or
channels) inside forward and again inside backward, so at most one block is held in fp32 and
nothing fp32 of the weight is saved for backward. The weight gradient is dense fp32 (as any
gradient); `step` applies SGD block by block and re-quantizes with a freshly fitted transform.

Variables of other layer types (GRU) stay fp32. Wire format of one quantized variable (codec
"omc"): alpha and beta as float32, then ceil(n * bits / 8) bytes of little-endian packed codes.
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
]

_FORMATS = ("int", "float")

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
    """One variable held as packed codes and an (alpha, beta) transform; mutable in place."""

    def __init__(self, shape: tuple[int, ...], cfg: OMCConfig, buf: np.ndarray, alpha: float, beta: float) -> None:
        self.shape, self.cfg = tuple(shape), cfg
        self.n = math.prod(self.shape)
        self.buf, self.alpha, self.beta = buf, alpha, beta
        self.grad: torch.Tensor | None = None

    @classmethod
    def from_tensor(cls, w: torch.Tensor, cfg: OMCConfig, *, generator: torch.Generator | None = None,
                    transform: tuple[float, float] | None = None) -> "QuantizedParam":
        w = w.detach().to(torch.float32)
        alpha, beta = transform or fit_transform(float(w.min()), float(w.max()), bits=cfg.bits, fmt=cfg.fmt, exp_bits=cfg.exp_bits)
        codes = quantize(w, alpha, beta, bits=cfg.bits, fmt=cfg.fmt, exp_bits=cfg.exp_bits, generator=generator)
        return cls(tuple(w.shape), cfg, _pack(codes.numpy(), cfg.bits), alpha, beta)

    @property
    def row_numel(self) -> int:
        return self.n // self.shape[0] if self.shape and self.shape[0] else self.n

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows (dim 0) r0..r1-1 decompressed to a new fp32 tensor."""
        rn = self.row_numel
        codes = torch.from_numpy(_unpack(self.buf, self.cfg.bits, r0 * rn, r1 * rn))
        c = self.cfg
        return dequantize(codes, self.alpha, self.beta, bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits).reshape((r1 - r0,) + self.shape[1:])

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


class _QOp(torch.autograd.Function):
    """y = op(x, W, b) with W decompressed block by block (dim 0); backward re-decompresses."""

    @staticmethod
    def forward(ctx, x, token, bias, mod):  # noqa: ANN001 - autograd signature
        qp, nb = mod.qweight, mod.block_rows
        outs = []
        for r0 in range(0, qp.shape[0], nb):
            w = mod.tracker.track(qp.rows(r0, min(r0 + nb, qp.shape[0])))
            outs.append(mod.op(x, w, None))
            del w
        y = torch.cat(outs, dim=1)
        if bias is not None:
            y = y + bias.reshape((1, -1) + (1,) * (y.dim() - 2))
        ctx.save_for_backward(x)
        ctx.mod, ctx.has_bias = mod, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001
        (x,) = ctx.saved_tensors
        mod = ctx.mod
        qp, nb = mod.qweight, mod.block_rows
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty(qp.shape)
        for r0 in range(0, qp.shape[0], nb):
            r1 = min(r0 + nb, qp.shape[0])
            g = gy[:, r0:r1]
            w = mod.tracker.track(qp.rows(r0, r1))
            if gx is not None:
                gx += mod.grad_input(x, w, g)
            gw[r0:r1] = mod.grad_weight(x, w, g)
            del w
        qp.grad = gw if qp.grad is None else qp.grad + gw
        gb = gy.sum(dim=[d for d in range(gy.dim()) if d != 1]) if ctx.has_bias else None
        return gx, torch.zeros(()), gb, None


class _QModule(nn.Module):
    """Stand-in for a Linear / Conv1d / Conv2d whose weight is a `QuantizedParam`."""

    def __init__(self, orig: nn.Module, qweight: QuantizedParam, tracker: _Transient, block_bytes: int) -> None:
        super().__init__()
        self.qweight, self.tracker = qweight, tracker
        self.block_rows = _block_rows(qweight.shape, block_bytes)
        self.bias = orig.bias
        self.token = nn.Parameter(torch.zeros(()))  # makes autograd call backward even for the first layer
        if isinstance(orig, nn.Linear):
            self.op = lambda x, w, b: F.linear(x, w, b)
            self.grad_input = lambda x, w, g: g @ w
            self.grad_weight = lambda x, w, g: g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        else:
            conv = F.conv1d if isinstance(orig, nn.Conv1d) else F.conv2d
            gi = torch.nn.grad.conv1d_input if isinstance(orig, nn.Conv1d) else torch.nn.grad.conv2d_input
            gwf = torch.nn.grad.conv1d_weight if isinstance(orig, nn.Conv1d) else torch.nn.grad.conv2d_weight
            kw = dict(stride=orig.stride, padding=orig.padding, dilation=orig.dilation, groups=orig.groups)
            if orig.groups != 1 or isinstance(orig.padding, str):
                raise ValueError("OMC supports convolutions with groups=1 and numeric padding")
            self.op = lambda x, w, b: conv(x, w, b, **kw)
            self.grad_input = lambda x, w, g: gi(x.shape, w, g, **kw)
            self.grad_weight = lambda x, w, g: gwf(x, w.shape, g, **kw)

    qbias: QuantizedParam | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if self.qbias is not None:  # weights_only=False: the bias is decompressed too
            qb = self.qbias
            bias = self.tracker.track(qb.rows(0, qb.shape[0])).requires_grad_(True)
            bias.register_hook(lambda g, qb=qb: setattr(qb, "grad", g if qb.grad is None else qb.grad + g))
        return _QOp.apply(x, self.token, bias, self)


_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def quantizable_names(model: nn.Module) -> list[str]:
    """Names of the weights OMC can hold quantized (Linear and Conv kernels), in model order."""
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, _SUPPORTED)]


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
        self._names = list(model.state_dict())
        mods = {n: m for n, m in model.named_modules() if isinstance(m, _SUPPORTED)}
        names = quantizable_names(model)
        sizes = {n: mods[_mod_name(n)].weight.numel() for n in names}
        self.fp32_names = _pick_fp32(names, sizes, cfg.partial_fp32_fraction, seed)
        chosen = [n for n in names if n not in self.fp32_names]
        tensors = {n: mods[_mod_name(n)].weight for n in chosen}
        if not cfg.weights_only:
            tensors.update({f"{_mod_name(n)}.bias".lstrip("."): mods[_mod_name(n)].bias
                            for n in chosen if mods[_mod_name(n)].bias is not None})
        shared = None
        if not cfg.per_variable and tensors:
            lo = min(float(t.detach().min()) for t in tensors.values())
            hi = max(float(t.detach().max()) for t in tensors.values())
            shared = fit_transform(lo, hi, bits=cfg.bits, fmt=cfg.fmt, exp_bits=cfg.exp_bits)
        self.q = {n: QuantizedParam.from_tensor(t, cfg, transform=shared) for n, t in tensors.items()}
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        for name in chosen:
            mname = _mod_name(name)
            orig = mods[mname]
            qm = _QModule(orig, self.q[name], self.tracker, cfg.block_bytes)
            bname = f"{mname}.bias".lstrip(".")
            if bname in self.q:
                qm.bias, qm.qbias = None, self.q[bname]
                orig.bias = nn.Parameter(torch.empty(0))
            parent, attr = _parent(model, mname)
            self._swapped.append((parent, attr, orig))
            parent._modules[attr] = qm
            orig.weight = nn.Parameter(torch.empty(0))  # no fp32 copy is held while training

    def fp32_parameters(self) -> list[nn.Parameter]:
        """Parameters held in fp32 (biases, fp32-kept weights, other layers' parameters)."""
        return [p for n, p in self.model.named_parameters() if not n.endswith("token")]

    def step(self, lr: float) -> None:
        """SGD step: fp32 parameters in place; each quantized variable decompressed block by
        block, updated and re-quantized with a refitted transform (stochastic if configured)."""
        with torch.no_grad():
            for p in self.fp32_parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
                    p.grad = None
            for m in self.model.modules():
                if isinstance(m, _QModule):
                    m.token.grad = None
            shared = None
            if not self.cfg.per_variable:
                shared = self._range(self.q.values(), lr)
            for qp in self.q.values():
                self._requantize(qp, lr, shared or self._range([qp], lr))

    def _each_block(self, qp: QuantizedParam, lr: float, fn) -> None:
        """fn(r0, r1, w) for each block of rows of the updated variable, one block alive at a time."""
        nb = _block_rows(qp.shape, self.cfg.block_bytes)
        for r0 in range(0, qp.shape[0], nb):
            r1 = min(r0 + nb, qp.shape[0])
            w = self.tracker.track(qp.rows(r0, r1))
            if qp.grad is not None:
                w.add_(qp.grad[r0:r1], alpha=-lr)
            fn(r0, r1, w)
            del w

    def _range(self, qps: Iterable[QuantizedParam], lr: float) -> tuple[float, float]:
        # Pass 1 of 2: the range of the updated values, without holding a whole variable in fp32.
        lo, hi = [math.inf], [-math.inf]

        def see(r0, r1, w):
            lo[0], hi[0] = min(lo[0], float(w.min())), max(hi[0], float(w.max()))

        for qp in qps:
            self._each_block(qp, lr, see)
        c = self.cfg
        return fit_transform(lo[0], hi[0], bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits)

    def _requantize(self, qp: QuantizedParam, lr: float, transform: tuple[float, float]) -> None:
        c = self.cfg
        gen = self._gen if c.stochastic else None
        codes = torch.empty(qp.n, dtype=torch.int32)  # bookkeeping; packed right below
        rn = qp.row_numel

        def put(r0, r1, w):
            codes[r0 * rn : r1 * rn] = quantize(w, *transform, bits=c.bits, fmt=c.fmt, exp_bits=c.exp_bits, generator=gen).reshape(-1)

        self._each_block(qp, lr, put)
        qp.buf, (qp.alpha, qp.beta), qp.grad = _pack(codes.numpy(), c.bits), transform, None

    # -- accounting -----------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes of parameters held between operations: packed codes + 8 bytes of transform per
        quantized variable, plus every fp32 parameter."""
        q = sum(qp.stored_bytes() for qp in self.q.values())
        return q + sum(p.numel() * p.element_size() for p in self.fp32_parameters())

    def peak_transient_bytes(self) -> int:
        """The most bytes of decompressed fp32 weight blocks alive at once, so far."""
        return self.tracker.peak

    def param_memory_bytes(self) -> int:
        """Stored bytes plus the peak of simultaneously decompressed fp32 blocks."""
        return self.stored_bytes() + self.peak_transient_bytes()

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
        mod = self.model.get_submodule(_mod_name(name))
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
        for name in self.q:
            mname, attr = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(self.model.get_submodule(mname), attr, nn.Parameter(values[name]))
        self._swapped = []


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
