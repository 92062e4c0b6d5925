"""`p2u`: all P2U stages in one payload, for `broadcast: p2u` where no streaming is wanted.

Wire: the stage payloads' bytes back to back (stage sizes follow from shape, bits and block;
the exact stage, if any, is last and takes the rest). Decode returns the reconstruction from
every stage. The progressive, per-stage form is `fedray.compression.p2u`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..codec import Codec, CodecContext, register_codec
from ..payload import Payload, PayloadError, param
from ._buf import as_bytes

# fedray.compression.p2u imports this package's helpers, so it is imported lazily here.


def _p2u():
    from .. import p2u

    return p2u

__all__ = ["P2U"]


@register_codec("p2u")
class P2U(Codec):
    """Progressive precision stages (see `P2UConfig`) carried as one payload."""

    def __init__(self, stage_bits: Sequence[int] = (4, 4, 8), exact_final: bool = False, block: int = 4096) -> None:
        self.cfg = _p2u().P2UConfig(stage_bits=tuple(stage_bits) if isinstance(stage_bits, (list, tuple)) else stage_bits,
                             exact_final=exact_final, block=block)

    def config(self) -> dict:
        return {"stage_bits": list(self.cfg.stage_bits), "exact_final": self.cfg.exact_final, "block": self.cfg.block}

    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload:
        stages = _p2u().encode_stages(x, cfg=self.cfg)
        data = np.concatenate([np.frombuffer(memoryview(s.data), np.uint8) for s in stages])
        params = {"stage_bits": ",".join(map(str, self.cfg.stage_bits)), "exact": int(self.cfg.exact_final),
                  "block": stages[0].params["block"]}
        if self.cfg.exact_final:
            params["raw"] = 4 * int(np.prod(x.shape, dtype=np.int64))
        return self._payload(x, params, data)

    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        n = self._check(p)
        text = param(p, "stage_bits", str)
        try:
            bits = tuple(int(b) for b in text.split(",")) if len(text) <= 64 else ()
            cfg = _p2u().P2UConfig(stage_bits=bits, exact_final=bool(param(p, "exact", int, 0, 1)),
                            block=param(p, "block", int, 1, max(n, 1)))
        except ValueError as e:
            raise PayloadError(f"p2u: bad stage parameters: {e}") from None
        sizes = _p2u().stage_bytes(cfg=cfg, shape=p.shape)
        mv = as_bytes(p)
        fixed = sum(s for s in sizes if s is not None)
        if mv.nbytes < fixed or (not cfg.exact_final and mv.nbytes != fixed):
            raise PayloadError(f"p2u: payload has {mv.nbytes} bytes, its stages need {fixed}")
        sizes[-1] = sizes[-1] if sizes[-1] is not None else mv.nbytes - fixed
        stages, off, prior = [], 0, 0
        for k, size in enumerate(sizes):
            params = {"stage": k, "stages": cfg.num_stages, "block": cfg.block, "prior_bits": prior,
                      "bits": cfg.stage_bits[k] if k < len(cfg.stage_bits) else 0}
            if k == len(cfg.stage_bits):
                params["exact"] = 1
            else:
                prior += cfg.stage_bits[k]
            stages.append(Payload(_p2u().STAGE_CODEC, 1, p.dtype, p.shape, params, mv[off : off + size]))
            off += size
        return _p2u().decode_stages(stages)

    def wire_bytes(self, shape: tuple[int, ...]) -> int | None:
        sizes = _p2u().stage_bytes(cfg=self.cfg, shape=shape)
        return None if None in sizes else sum(sizes)

    def max_wire_bytes(self, shape: tuple[int, ...]) -> int:
        sizes = _p2u().stage_bytes(cfg=self.cfg, shape=shape)
        n = int(np.prod(shape, dtype=np.int64))
        return sum(s if s is not None else 4 * n + 4096 for s in sizes)
