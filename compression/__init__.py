"""fedray.compression: codecs for model updates and broadcasts (torch and numpy only).

Usage:
    codec = get_codec("int8", granularity="channel")
    payload = codec.encode(tensor)
    restored = decode_checked(codec, payload)

Codecs and wire formats: docs/compression.md.
"""

from .accumulate import add_scaled_
from .codec import (
    Codec,
    CodecContext,
    UnknownCodecError,
    available_codecs,
    decode_checked,
    get_codec,
    register_codec,
)
from .p2u import P2UConfig, decode_stages, encode_stages, stage_bytes
from .payload import MAX_TENSOR_ELEMENTS, Payload, PayloadError
from .state import CodecState, CodecStateStore, ErrorFeedbackState

__all__ = [
    "MAX_TENSOR_ELEMENTS",
    "Codec",
    "CodecContext",
    "CodecState",
    "CodecStateStore",
    "ErrorFeedbackState",
    "P2UConfig",
    "Payload",
    "PayloadError",
    "UnknownCodecError",
    "add_scaled_",
    "available_codecs",
    "decode_checked",
    "decode_stages",
    "encode_stages",
    "get_codec",
    "register_codec",
    "stage_bytes",
]
