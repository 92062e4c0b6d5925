"""The unit every codec produces and consumes: one encoded tensor.

A `Payload` is plain data (codec name and version, original dtype and shape, scalar codec
parameters, raw bytes). Protobuf conversion lives in `fedray.proto.serde`, never here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Union

import numpy as np

__all__ = [
    "MAX_TENSOR_ELEMENTS",
    "Param",
    "Payload",
    "PayloadError",
    "check_shape",
    "param",
]

# 2**31 elements (8 GiB of float32): the largest tensor a decoder will allocate. A hostile
# payload that declares more is rejected before any allocation.
MAX_TENSOR_ELEMENTS = 1 << 31

Param = Union[int, float, str]

_DTYPES = ("float32", "float16", "bfloat16", "float64")


class PayloadError(ValueError):
    """A payload is malformed: wrong size, shape, dtype, codec or parameters.

    The gRPC layer turns this into INVALID_ARGUMENT; nothing is aggregated.
    """


@dataclass(frozen=True)
class Payload:
    """One encoded tensor.

    Attributes:
        codec: registry name of the codec that produced `data`.
        version: the codec's wire-format version.
        dtype: dtype of the original tensor (decode returns this dtype).
        shape: shape of the original tensor.
        params: scalar codec parameters needed to decode (e.g. bits, block size).
        data: the encoded bytes: `bytes`, a flat uint8 numpy array (what encoders return: it
            pickles without a copy into Ray's object store) or a memoryview (what the server
            decodes from, zero-copy).
    """

    codec: str
    version: int
    dtype: str
    shape: tuple[int, ...]
    params: Mapping[str, Param] = field(default_factory=dict)
    data: bytes | bytearray | memoryview | np.ndarray = b""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of `data`: the payload's size on the wire, framing aside."""
        return memoryview(self.data).nbytes


def check_shape(p: Payload) -> int:
    """Validate dtype and shape of `p`; return its element count.

    Raises:
        PayloadError: negative or oversized shape, unknown dtype.
    """
    if p.dtype not in _DTYPES:
        raise PayloadError(f"{p.codec}: dtype {p.dtype!r} is not one of {_DTYPES}")
    if any((not isinstance(s, int)) or s < 0 for s in p.shape):
        raise PayloadError(f"{p.codec}: shape {p.shape} has a negative or non-integer dimension")
    n = math.prod(p.shape)
    if n > MAX_TENSOR_ELEMENTS:
        raise PayloadError(
            f"{p.codec}: shape {p.shape} declares {n} elements, over the cap of {MAX_TENSOR_ELEMENTS}"
        )
    return n


def param(p: Payload, name: str, kind: type, lo: float | None = None, hi: float | None = None):
    """Read parameter `name` of payload `p` as `kind`, checking the range [lo, hi].

    Raises:
        PayloadError: the parameter is missing, of the wrong type or out of range.
    """
    if name not in p.params:
        raise PayloadError(f"{p.codec}: missing parameter {name!r}")
    v = p.params[name]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise PayloadError(f"{p.codec}: parameter {name!r} must be an integer, got {v!r}")
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PayloadError(f"{p.codec}: parameter {name!r} must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise PayloadError(f"{p.codec}: parameter {name!r} must be finite, got {v!r}")
    if kind is str and not isinstance(v, str):
        raise PayloadError(f"{p.codec}: parameter {name!r} must be a string, got {v!r}")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise PayloadError(f"{p.codec}: parameter {name!r}={v!r} is outside [{lo}, {hi}]")
    return v
