"""The global model as it goes down: encoded once per round by the driver, put into Ray's object
store once, decoded by every worker (and by the shards, which serve it to real clients).

Three forms: one codec for every tensor (`broadcast: int8`, ...); OMC's stored form ("omc"
payloads for quantized weights, fp32 for the rest); P2U's precision stages (`broadcast: p2u`),
where clients start training after the stage the job names for the round.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from fedray.compression import decode_checked, get_codec
from fedray.compression.p2u import P2UConfig, decode_stages, encode_stages
from fedray.compression.payload import Payload

__all__ = ["Broadcast", "PickledOnce", "broadcast_of_stages", "decode_broadcast", "make_broadcast", "p2u_config",
           "stages_to_use"]

Tensors = tuple[tuple[str, Payload], ...]


class PickledOnce:
    """A small argument of several Ray calls (a broadcast passed inline to the workers and the
    shards), pickled once: each call then copies its bytes instead of walking the object again.
    The callee receives the object itself."""

    __slots__ = ("blob",)

    def __init__(self, obj: Any) -> None:
        self.blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def __reduce__(self):
        return pickle.loads, (self.blob,)


@dataclass(frozen=True)
class Broadcast:
    """One round's model: `stages[k]` holds every tensor's stage-k payload (one stage unless P2U).

    `use_stages` is how many stages clients decode before they train; `codec` and `params` are
    the job's broadcast codec (payloads of other codecs, e.g. fp32 tensors under OMC, decode
    with their own defaults).
    """

    stages: tuple[Tensors, ...]
    codec: str
    params: Mapping[str, Any]
    use_stages: int = 1

    def stage_bytes(self) -> list[int]:
        return [sum(p.nbytes for _, p in st) for st in self.stages]

    def bytes_used(self) -> int:
        """Bytes a client receives before it trains."""
        return sum(self.stage_bytes()[: self.use_stages])


def p2u_config(params: Mapping[str, Any]) -> P2UConfig:
    """The P2U settings of `broadcast_params` (lists become tuples).

    Raises:
        ValueError: a setting is out of range.
    """
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return P2UConfig(**kw)


def make_broadcast(
    params: Mapping[str, torch.Tensor], *, codec: str, codec_params: Mapping[str, Any], round: int,
    omc_cfg=None, quantized: Iterable[str] = (), sparse: Mapping[str, float] | None = None,
) -> Broadcast:
    """Encode the global model for round `round`. `sparse` (pruning) names tensors that go as
    exact top-k payloads keeping that fraction of their entries (the unpruned ones)."""
    if omc_cfg is not None:
        from fedray.compression.omc import encode_params

        enc = encode_params(params, omc_cfg, quantized=quantized)
        return Broadcast((tuple((k, enc[k]) for k in params),), "omc", {})
    if codec == "p2u":
        cfg = p2u_config(codec_params)
        per = {k: encode_stages(v, cfg=cfg) for k, v in params.items()}
        stages = tuple(tuple((k, per[k][s]) for k in params) for s in range(cfg.num_stages))
        return Broadcast(stages, codec, dict(codec_params), use_stages=cfg.start_stage(round) + 1)
    c = get_codec(codec, **dict(codec_params))
    sparse = sparse or {}
    enc = []
    for k, v in params.items():
        if k in sparse:
            enc.append((k, get_codec("topk", ratio=max(sparse[k], 1e-6), method="exact").encode(v)))
        else:
            enc.append((k, c.encode(v)))
    return Broadcast((tuple(enc),), codec, dict(codec_params))


def stages_to_use(*, codec: str, codec_params: Mapping[str, Any], round: int) -> int:
    """How many stages a client decodes before it trains in `round` (P2U: the job's start
    stage; every other broadcast: one)."""
    return p2u_config(codec_params).start_stage(round) + 1 if codec == "p2u" else 1


def broadcast_of_stages(stages: Sequence[Sequence[tuple[str, Payload]]], *, codec: str,
                        codec_params: Mapping[str, Any], omc: bool, round: int) -> Broadcast:
    """The `Broadcast` a real client rebuilds from the stages it downloaded (in order), as the
    worker actors receive it: OMC's stored form, P2U's stages, or one codec's payloads."""
    st = tuple(tuple(s) for s in stages)
    if omc:
        return Broadcast(st[:1], "omc", {})
    return Broadcast(st, codec, dict(codec_params), use_stages=min(len(st), stages_to_use(
        codec=codec, codec_params=codec_params, round=round)))


def decode_broadcast(b: Broadcast, stages: int | None = None) -> dict[str, torch.Tensor]:
    """The model from the first `stages` stages (default: the ones clients use).

    Raises:
        PayloadError: a payload is malformed.
    """
    n = b.use_stages if stages is None else stages
    if b.codec == "p2u":
        names = [k for k, _ in b.stages[0]]
        return {k: decode_stages([dict(b.stages[s])[k] for s in range(n)]) for k in names}
    return decode_tensors(b.stages[0], b.codec, b.params)


def decode_tensors(tensors: Sequence[tuple[str, Payload]], codec: str, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Decode named payloads: those of `codec` with the job's `params`, others with defaults."""
    cache: dict[str, Any] = {}
    out = {}
    for name, p in tensors:
        if p.codec not in cache:
            cache[p.codec] = get_codec(p.codec, **(dict(params) if p.codec == codec else {}))
        out[name] = decode_checked(cache[p.codec], p)
    return out
