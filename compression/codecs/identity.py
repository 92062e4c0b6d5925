"""`identity`: raw float32, the baseline every byte count is compared against."""

from __future__ import annotations

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload
from ._buf import expect_nbytes, view

__all__ = ["Identity"]


@register_codec("identity")
class Identity(Codec):
    """fp32 on the wire: 32 bits per value, exact."""

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        a = x.detach().to(torch.float32).contiguous().cpu().numpy()
        return self._payload(x, {}, a.reshape(-1).view(np.uint8))

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        return self._decode_fresh(p, ctx)

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        np.copyto(out, view(expect_nbytes(p, 4 * n), np.float32, n, 0))

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        return 4 * int(np.prod(shape, dtype=np.int64))
