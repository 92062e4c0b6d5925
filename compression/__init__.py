"""fedray.compression: codecs for model updates and broadcasts (torch and numpy only).

Usage:
    codec = get_codec("int8", granularity="channel")
    payload = codec.encode(tensor)
    restored = decode_checked(codec, payload)
"""

from .codec import (
    Codec,
    CodecContext,
    UnknownCodecError,
    available_codecs,
    decode_checked,
    get_codec,
    register_codec,
)
from .payload import MAX_TENSOR_ELEMENTS, Payload, PayloadError

__all__ = [
    "MAX_TENSOR_ELEMENTS",
    "Codec",
    "CodecContext",
    "Payload",
    "PayloadError",
    "UnknownCodecError",
    "available_codecs",
    "decode_checked",
    "get_codec",
    "register_codec",
]
