"""Composite codecs: `zstd` (lossless stage), `ef` (error feedback) and `pipeline`.

Each wraps an inner codec and still produces one Payload: the inner payload's codec name,
version and params are nested under "inner." (see `_nest`), and decode checks them against the
configured inner codec before decoding.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import zstandard

from ..codec import Codec, CodecContext, get_codec, register_codec
from ..payload import Payload, PayloadError, param
from ._buf import as_bytes
from ._nest import build, max_wire_bytes, nest, unnest
from .sparse import RandomK, _Sparse

__all__ = ["ErrorFeedback", "Pipeline", "Zstd"]

_IN = "inner."


def _data_bytes(p: Payload):
    return p.data if isinstance(p.data, (bytes, bytearray)) else as_bytes(p)


@register_codec("zstd")
class Zstd(Codec):
    """zstd-compress the bytes of `inner`'s payload (lossless; pays off on sparse index
    streams and low-entropy codes, compression.md E.3). Wire: one zstd frame that declares
    its content size; params carry `raw`, the inner byte count."""

    def __init__(self, level: int = 3, inner: str | Codec = "identity",
                 inner_params: Mapping[str, Any] | None = None) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
            raise ValueError(f"zstd: level must be an integer in 1..22, got {level!r}")
        self.level = level
        self.inner = build(inner, inner_params, "zstd")

    @property
    def stateful(self) -> bool:  # zstd around ef keeps ef's memory
        return self.inner.stateful

    def config(self) -> dict:
        return {"level": self.level, "inner": self.inner.name, "inner_params": self.inner.config()}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        ip = self.inner.encode(x, ctx)
        frame = zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(_data_bytes(ip))
        return self._payload(x, {"raw": ip.nbytes, **nest(_IN, ip)}, np.frombuffer(frame, np.uint8))

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        self._check(p)
        raw = param(p, "raw", int, 0, max_wire_bytes(self.inner, p.shape))
        frame = as_bytes(p)
        try:
            declared = zstandard.frame_content_size(frame)
            if declared != raw:
                raise PayloadError(f"zstd: frame declares {declared} bytes, params say {raw}")
            data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=raw)
        except zstandard.ZstdError as e:
            raise PayloadError(f"zstd: corrupt frame: {e}") from None
        if len(data) != raw:
            raise PayloadError(f"zstd: frame holds {len(data)} bytes, params say {raw}")
        inner = unnest(p, _IN, self.inner, shape=p.shape, dtype=p.dtype, data=data)
        return self.inner.decode(inner, ctx)

    def max_wire_bytes(self, shape: tuple[int, ...]) -> int:
        raw = max_wire_bytes(self.inner, shape)
        return raw + raw // 128 + 1024  # zstd's worst-case expansion bound is smaller


@register_codec("ef")
class ErrorFeedback(Codec):
    """Error feedback around any (biased) codec: encode p = x + e, keep e = p - C(p).

    The residual e lives in `ctx.state.residuals[ctx.key]` (a `CodecState`, one per client,
    kept by the caller across rounds). With `ctx.state=None` there is no memory and the codec
    behaves as its inner codec. The wire format is the inner codec's.
    """

    def __init__(self, inner: str | Codec = "topk", inner_params: Mapping[str, Any] | None = None) -> None:
        self.inner = build(inner, inner_params, "ef")

    stateful = True

    def config(self) -> dict:
        return {"inner": self.inner.name, "inner_params": self.inner.config()}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        memory = None
        if ctx.state is not None:
            memory = getattr(ctx.state, "residuals", None)
            if not isinstance(memory, dict):
                raise ValueError("ef: ctx.state must be a CodecState (ErrorFeedbackState)")
        p = x.detach().to(torch.float32)
        e = memory.get(ctx.key) if memory is not None else None
        if e is not None and e.shape == p.shape:
            p = p + e
        ip = self.inner.encode(p, ctx)
        if memory is not None:
            memory[ctx.key] = p - self.inner.decode(ip, ctx).to(torch.float32)
        return self._payload(x, nest(_IN, ip), ip.data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        self._check(p)
        inner = unnest(p, _IN, self.inner, shape=p.shape, dtype=p.dtype, data=p.data)
        return self.inner.decode(inner, ctx)

    def wire_bytes(self, shape: tuple[int, ...]) -> int | None:
        return self.inner.wire_bytes(shape)

    def max_wire_bytes(self, shape: tuple[int, ...]) -> int:
        return max_wire_bytes(self.inner, shape)


def _stage(spec: str | Mapping[str, Any]) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("codec"), str):
        params = dict(spec)
        return params.pop("codec"), params
    raise ValueError(f"pipeline: a stage is a codec name or a mapping with a 'codec' key, got {spec!r}")


def _chain(stages: Sequence[Any]) -> Codec:
    name, params = _stage(stages[0])
    if name == "ef":
        if params or len(stages) < 2:
            raise ValueError("pipeline: 'ef' takes no params and wraps the stages after it")
        return ErrorFeedback(inner=_chain(stages[1:]))
    if name in ("pipeline", "zstd"):
        raise ValueError(f"pipeline: the first stage must be a tensor codec, got {name!r}")
    codec = get_codec(name, **params)
    for spec in stages[1:]:
        nxt, nparams = _stage(spec)
        if nxt == "zstd":
            codec = Zstd(inner=codec, **nparams)
        elif isinstance(codec, (_Sparse, RandomK)) and codec.values.name == "identity" and nxt not in ("ef", "pipeline"):
            codec = type(codec)(**{**codec.config(), "values": nxt, "values_params": nparams})
        else:
            raise ValueError(
                f"pipeline: stage {nxt!r} cannot follow {codec.name!r}: after a sparsifier comes one "
                "value codec, 'zstd' may follow any stage, and 'ef' may only come first"
            )
    return codec


@register_codec("pipeline")
class Pipeline(Codec):
    """Stages applied in order, e.g. ["ef", {"codec": "topk", "ratio": 0.01},
    {"codec": "uniform", "bits": 8}, "zstd"]: error feedback around top-1%, whose values are
    quantized to 8 bits, the whole payload then zstd-compressed."""

    def __init__(self, stages: Sequence[Any] = ("int8", "zstd")) -> None:
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(f"pipeline: stages must be a non-empty list of stages, got {stages!r}")
        self.stages = [dict(zip(("codec",), _stage(s)[:1])) | _stage(s)[1] for s in stages]
        self.chain = _chain(list(stages))

    @property
    def stateful(self) -> bool:
        return self.chain.stateful

    def config(self) -> dict:
        return {"stages": self.stages}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        ip = self.chain.encode(x, ctx)
        return self._payload(x, nest(_IN, ip), ip.data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        self._check(p)
        inner = unnest(p, _IN, self.chain, shape=p.shape, dtype=p.dtype, data=p.data)
        return self.chain.decode(inner, ctx)

    def wire_bytes(self, shape: tuple[int, ...]) -> int | None:
        return self.chain.wire_bytes(shape)

    def max_wire_bytes(self, shape: tuple[int, ...]) -> int:
        return max_wire_bytes(self.chain, shape)
