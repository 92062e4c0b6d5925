"""Nesting one codec's payload inside another's (wrappers, sparse values, pipelines).

The inner payload's codec name, version and params go into the outer params under a prefix
("inner.codec", "inner.version", "inner.<param>"), so a composite still travels as one Payload
with scalar params, and the decoder checks the inner name and version against its own config.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..codec import Codec, get_codec
from ..payload import Payload, PayloadError

__all__ = ["build", "max_wire_bytes", "nest", "unnest"]


def build(inner: str | Codec, inner_params: Mapping[str, Any] | None, owner: str) -> Codec:
    """The inner codec from a registry name and params (or an already built codec)."""
    if isinstance(inner, Codec):
        if inner_params:
            raise ValueError(f"{owner}: inner_params are given with an already built inner codec")
        return inner
    if not isinstance(inner, str):
        raise ValueError(f"{owner}: inner must be a codec name, got {inner!r}")
    if inner_params is not None and not isinstance(inner_params, Mapping):
        raise ValueError(f"{owner}: inner_params must be a mapping, got {inner_params!r}")
    try:
        return get_codec(inner, **dict(inner_params or {}))
    except ValueError as e:  # UnknownCodecError is a ValueError too
        raise ValueError(f"{owner}: inner codec: {e}") from None


def nest(prefix: str, p: Payload) -> dict[str, Any]:
    out: dict[str, Any] = {f"{prefix}codec": p.codec, f"{prefix}version": p.version}
    out.update({f"{prefix}{k}": v for k, v in p.params.items()})
    return out


def unnest(p: Payload, prefix: str, inner: Codec, *, shape, dtype: str, data) -> Payload:
    """The inner payload nested in `p` under `prefix`, checked against the expected `inner`."""
    name = p.params.get(f"{prefix}codec")
    version = p.params.get(f"{prefix}version")
    if name != inner.name or version != inner.version:
        raise PayloadError(
            f"{p.codec}: nested codec {name!r} v{version!r} does not match the configured "
            f"{inner.name!r} v{inner.version}"
        )
    params = {k[len(prefix):]: v for k, v in p.params.items() if k.startswith(prefix)}
    del params["codec"], params["version"]
    return Payload(inner.name, inner.version, dtype, tuple(shape), params, data)


def max_wire_bytes(codec: Codec, shape: tuple[int, ...]) -> int:
    """An upper bound on the payload bytes `codec` produces for `shape` (for pre-allocation
    checks of wrappers whose inner size is data-dependent)."""
    exact = codec.wire_bytes(shape)
    if exact is not None:
        return exact
    bound = getattr(codec, "max_wire_bytes", None)
    if bound is not None:
        return bound(shape)
    return 16 * math.prod(shape) + 4096
