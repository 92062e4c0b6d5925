"""`identity`: raw float32, the baseline every byte count is compared against."""

from __future__ import annotations

import numpy as np
import torch

from ..accumulate import ScaledAdd
from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError
from ._buf import all_finite, expect_nbytes, readonly_tensor, view

__all__ = ["Identity"]


@register_codec("identity")
class Identity(Codec):
    """fp32 on the wire: 32 bits per value, exact."""

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        a = x.detach().to(torch.float32).contiguous().cpu().numpy()
        return self._payload(x, {}, a.reshape(-1).view(np.uint8))

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        return self._decode_fresh(p, ctx)

    def fold(self, p: Payload, ctx: CodecContext = CodecContext(), *, scratch=None):
        """Add the float32 payload bytes into the sum as they are (no copy)."""
        n = self._check(p)
        if p.dtype != "float32":  # a declared narrower dtype is checked by decoding
            return super().fold(p, ctx, scratch=scratch)
        vals = view(expect_nbytes(p, 4 * n), np.float32, n, 0)
        if not all_finite(vals):
            raise PayloadError("identity: payload holds NaN or infinity")
        return ScaledAdd(readonly_tensor(vals))

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        np.copyto(out, view(expect_nbytes(p, 4 * n), np.float32, n, 0))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 * int(np.prod(shape, dtype=np.int64))
