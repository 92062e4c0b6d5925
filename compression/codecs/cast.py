"""`fp16` and `bf16`: 16-bit float casts, round to nearest even (compression.md D.1).

Wire layout: one little-endian 16-bit float per value, 2d bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload
from ._buf import CHUNK, expect_nbytes, flat32, readonly_tensor, view

__all__ = ["BF16", "FP16"]

_FP16_MAX = 65504.0


class _Cast16(Codec):
    _torch_dtype: torch.dtype
    _clamp: float | None = None

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        src = torch.from_numpy(flat32(x))
        out = np.empty(src.numel(), np.int16)  # numpy memory: hugepage-backed, no page-fault storm
        dst = torch.from_numpy(out).view(self._torch_dtype)
        tmp = torch.empty(min(CHUNK, src.numel()))
        for s in range(0, src.numel(), CHUNK):
            e = min(src.numel(), s + CHUNK)
            chunk = src[s:e]
            if self._clamp is not None:
                chunk = torch.clamp(chunk, -self._clamp, self._clamp, out=tmp[: e - s])
            dst[s:e].copy_(chunk)
        return self._payload(x, {}, out.view(np.uint8))

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        return self._decode_fresh(p, ctx)

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        bits = view(expect_nbytes(p, 2 * n), np.int16, n, 0)
        src = readonly_tensor(bits).view(self._torch_dtype)
        torch.from_numpy(out).copy_(src)

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 2 * int(np.prod(shape, dtype=np.int64))


@register_codec("fp16")
class FP16(_Cast16):
    """IEEE half precision; values beyond +-65504 are clamped first (NVFlare does the same)."""

    _torch_dtype = torch.float16
    _clamp = _FP16_MAX


@register_codec("bf16")
class BF16(_Cast16):
    """bfloat16: float32's exponent range with an 8-bit significand."""

    _torch_dtype = torch.bfloat16
