"""Conversion between fedray's own types and the v1 protobuf messages; gRPC glue.

This is the only module that imports generated code. Everything else speaks `Payload`,
`UpdateHeader`, `ModelStage` and plain callables.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import urllib.parse
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Protocol

import google_crc32c
import grpc
import numpy as np

from fedray.compression.payload import Payload, PayloadError

from ._generated import aggregation_pb2 as pb
from ._generated import aggregation_pb2_grpc as pb_grpc

__all__ = [
    "CHANNEL_OPTIONS",
    "CHUNK_BYTES",
    "GRPC_OPTIONS",
    "CLIENT_METADATA_KEY",
    "JOB_METADATA_KEY",
    "TOKEN_METADATA_KEY",
    "credentials",
    "AggregationHandler",
    "HealthInfo",
    "ModelStage",
    "RpcContext",
    "UpdateHeader",
    "add_aggregation_service",
    "call_download",
    "call_get_job",
    "call_health",
    "JobInfo",
    "TLSConfig",
    "open_channel",
    "retry_after_ms",
    "shard_index",
    "call_upload",
    "call_upload_batch",
    "BatchResult",
    "WireChunk",
    "WireUpload",
    "encode_upload",
    "upload_nbytes_many",
    "wire_nbytes",
    "payload_from_meta",
    "upload_messages",
]

# 1 MiB chunks: 1.8 GB/s on loopback here, against 0.27 GB/s for one large unary message
# (research/environment.md).
CHUNK_BYTES = 1 << 20
# A call's credentials travel in its metadata (HTTP/2 headers): the server checks them before it
# reads the request's body (`credentials`, `add_aggregation_service`).
TOKEN_METADATA_KEY = "x-fedray-token"
JOB_METADATA_KEY = "x-fedray-job-id"
CLIENT_METADATA_KEY = "x-fedray-client-id"
RETRY_AFTER_KEY = "retry-after-ms"  # fedray's own back-off hint, kept for older clients
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's standard one (read by gRPC's own retries)
# Chunks are about 1 MB, so 8 MiB leaves room for headers with many tensors.
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
)
# Calls that are safe to replay are retried by gRPC itself on UNAVAILABLE (a shard restarting, a
# connection reset), honouring the server's push-back: GetJob, Health, and Download until its
# first stage arrives (gRPC commits a server stream at its first message). Uploads are client
# streams of ~1 MiB chunks that gRPC cannot replay once sent: `upload_with_retry` retries those.
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "fedray.v1.Aggregation", "method": m} for m in ("GetJob", "Health", "Download")],
    "retryPolicy": {
        "maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    },
}]})
CHANNEL_OPTIONS = GRPC_OPTIONS + (("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG))


def credentials(job_id: str, client_id: int, token: str) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates a call (every method but Health): the job id
    (percent-encoded, so any job name is a valid header value), the client id in decimal and the
    client's token. The server refuses a call without valid ones from its headers alone, before
    it receives the request's body."""
    return ((JOB_METADATA_KEY, urllib.parse.quote(job_id, safe="")), (CLIENT_METADATA_KEY, str(int(client_id))),
            (TOKEN_METADATA_KEY, token))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an update or model: its name, its payload metadata and its byte span."""

    name: str
    payload: Payload  # `data` is empty until the bytes arrive
    nbytes: int
    key: bytes = b""  # the serialized metadata: equal keys, equal entries (a cache key for servers)


@dataclass(frozen=True)
class UpdateHeader:
    job_id: str
    round: int
    client_id: int
    attempt: int
    weight: float
    tensors: tuple[TensorEntry, ...]
    subnet_seed: int = 0
    keep_rate: float = 1.0
    metrics: Mapping[str, float] = field(default_factory=dict)
    digest: bytes = b""
    weights: bool = False
    digest_kind: int = 0

    @functools.cached_property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ModelStage:
    """One precision stage of a downloaded model (stage 0 is the whole model for one-shot codecs)."""

    round: int
    stage: int
    num_stages: int
    tensors: tuple[tuple[str, Payload], ...]


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    round: int
    round_open: bool
    finished: bool
    num_rounds: int
    spec_json: str
    shard_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS: certificate and key (PEM files); with `client_ca_file`, clients must present a
    certificate signed by that CA (mutual TLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        read = lambda f: open(f, "rb").read()  # noqa: E731
        ca = read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(read(self.key_file), read(self.cert_file))], root_certificates=ca, require_client_auth=ca is not None
        )


def open_channel(
    address: str, *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to the service: plaintext, or TLS when `ca_file` is given (mutual with cert and key)."""
    if ca_file is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    read = lambda f: open(f, "rb").read() if f else None  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
    opts = CHANNEL_OPTIONS + ((("grpc.ssl_target_name_override", server_name),) if server_name else ())
    return grpc.secure_channel(address, creds, options=opts)


def shard_index(client_id: int, num_shards: int) -> int:
    """The shard of a client: a stable hash (splitmix64) of its id, the same in every process."""
    if num_shards == 1:
        return 0
    z = (int(client_id) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % num_shards


def retry_after_ms(err: grpc.RpcError) -> int | None:
    """The server's back-off hint (gRPC's `grpc-retry-pushback-ms` or fedray's `retry-after-ms`
    trailer), if it sent one."""
    for k, v in (err.trailing_metadata() or ()):
        if k in (PUSHBACK_KEY, RETRY_AFTER_KEY):
            try:
                return int(v)
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class HealthInfo:
    status: str
    job_id: str
    round: int
    updates_committed: int
    bytes_received: int


# -- payload <-> TensorMeta -------------------------------------------------------------------


def _meta(name: str, p: Payload) -> pb.TensorMeta:
    m = pb.TensorMeta(
        name=name, codec=p.codec, codec_version=p.version, dtype=p.dtype, shape=list(p.shape), nbytes=p.nbytes
    )
    for k, v in p.params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise TypeError(f"codec parameter {k!r}={v!r} must be int, float or str")
        if isinstance(v, int):
            m.params[k].i = v
        elif isinstance(v, float):
            m.params[k].f = v
        else:
            m.params[k].s = v
    return m


_METAS_CACHE: dict[tuple, object] = {}


def _metas(tensors: list[tuple[str, Payload]]):
    """The TensorMeta list of an update. The clients of a call share it (same names, codec,
    shapes, parameters and sizes), so it is built once: ~40 us a client otherwise."""
    key = tuple((n, p.codec, p.version, p.dtype, p.shape, tuple((k, type(v), v) for k, v in p.params.items()),
                 p.nbytes) for n, p in tensors)
    try:
        hit = _METAS_CACHE.get(key)
    except TypeError:  # an unhashable parameter value: _meta reports it
        hit, key = None, None
    if hit is None:
        hit = pb.UpdateHeader(tensors=[_meta(n, p) for n, p in tensors]).tensors
        if key is not None:
            if len(_METAS_CACHE) >= 1024:
                _METAS_CACHE.clear()
            _METAS_CACHE[key] = hit
    return hit


def payload_from_meta(m, data: bytes | memoryview = b"") -> Payload:
    """Build a `Payload` from a `TensorMeta` message and its bytes (not copied)."""
    params = {}
    for k, v in m.params.items():
        which = v.WhichOneof("value")
        if which is None:
            raise PayloadError(f"tensor {m.name!r}: parameter {k!r} has no value")
        params[k] = getattr(v, which)
    return Payload(
        codec=m.codec, version=m.codec_version, dtype=m.dtype, shape=tuple(int(s) for s in m.shape),
        params=params, data=data,
    )


def _header(h) -> UpdateHeader:
    return UpdateHeader(
        job_id=h.job_id, round=h.round, client_id=h.client_id, attempt=h.attempt, weight=h.weight,
        tensors=_entries(h.tensors), subnet_seed=h.subnet_seed, keep_rate=h.keep_rate,
        metrics=dict(h.metrics), digest=h.digest, weights=h.weights, digest_kind=h.digest_kind,
    )


_ENTRY_CACHE: dict[bytes, TensorEntry] = {}


def _entries(metas) -> tuple[TensorEntry, ...]:
    # The clients of a job send the same tensor metadata over and over: converting it costs
    # ~50 us a tensor (protobuf map iteration), a lookup by its serialized bytes ~2 us.
    out = []
    for m in metas:
        key = m.SerializeToString()
        e = _ENTRY_CACHE.get(key)
        if e is None:
            e = TensorEntry(m.name, payload_from_meta(m), int(m.nbytes), key)
            if len(key) <= 1024:  # bounded: 4096 entries of at most 1 KiB (servers call this after the token check)
                if len(_ENTRY_CACHE) >= 4096:
                    _ENTRY_CACHE.clear()
                _ENTRY_CACHE[key] = e
        out.append(e)
    return tuple(out)


# -- uploads ------------------------------------------------------------------------------------


def _chunked(parts: Iterable[memoryview], chunk_bytes: int) -> Iterator[memoryview | bytes]:
    """Re-slice a sequence of byte views into chunks of `chunk_bytes` (the last may be shorter)."""
    pending: list[memoryview] = []
    size = 0
    for part in parts:
        while part.nbytes:
            take = min(chunk_bytes - size, part.nbytes)
            pending.append(part[:take])
            size += take
            part = part[take:]
            if size == chunk_bytes:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, size = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


def upload_messages(
    *,
    job_id: str,
    round: int,
    client_id: int,
    weight: float,
    tensors: Iterable[tuple[str, Payload]],
    attempt: int = 0,
    subnet_seed: int = 0,
    keep_rate: float = 1.0,
    metrics: Mapping[str, float] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    weights: bool = False,
) -> list:
    """The UploadChunk messages of one update: a header, then the payload bytes in chunks (as
    protobuf objects, e.g. to inspect or alter; `encode_upload` is the same stream, uncopied)."""
    w = encode_upload(job_id=job_id, round=round, client_id=client_id, weight=weight, tensors=tensors,
                      attempt=attempt, subnet_seed=subnet_seed, keep_rate=keep_rate, metrics=metrics,
                      chunk_bytes=chunk_bytes, weights=weights)
    msgs, offset = [], 0
    for c in w.chunks or (b"",):
        msgs.append(pb.UploadChunk(data=bytes(c), offset=offset))
        offset += len(c)
    msgs[0].header.CopyFrom(w.header)
    return msgs


# -- the chunk messages on the wire, without protobuf's copies ------------------------------------
#
# UploadChunk carries ~1 MB of payload bytes (fields: 1 header, 2 data, 3 offset). protobuf's
# Python runtime copies a bytes field twice on the way in (parse, then attribute access) and
# twice on the way out (the field assignment, then serialization). The functions below speak the
# same wire format: the server reads `data` as a memoryview of the buffer gRPC received (no copy),
# and a client's data chunks are framed once (one join) and reused across retries.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(mv: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(mv) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = mv[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, i  # a 10-byte varint keeps 64 bits, as protobuf does
        shift += 7


@dataclass(frozen=True)
class WireChunk:
    """One received UploadChunk: its header (parsed) if any, its data as a view of gRPC's buffer,
    and its offset. `error` is set (and the rest empty) when the bytes are not a valid message."""

    header: object | None
    data: memoryview
    offset: int
    error: str | None = None

    def HasField(self, name: str) -> bool:  # the one pb.UploadChunk method the servicer uses
        return name == "header" and self.header is not None


def _fields(mv: memoryview, max_fields: int) -> Iterator[tuple[int, memoryview | int | None]]:
    """The (field number, value) pairs of one protobuf message: a view for length-delimited
    fields, an int for varints, None for fixed-width ones (skipped). At most `max_fields`: this
    runs before any token is checked, so a message of a million one-byte fields must cost what a
    message of a few does.

    Raises:
        ValueError: the bytes are not a well-formed message (group wire types, which protobuf
            would skip and these messages never use, included), or hold too many fields.
    """
    i, count = 0, 0
    while i < len(mv):
        count += 1
        if count > max_fields:
            raise ValueError(f"more than {max_fields} fields")
        key, i = _read_varint(mv, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 2:
            ln, i = _read_varint(mv, i)
            if i + ln > len(mv):
                raise ValueError("length-delimited field runs past the end")
            yield field, mv[i : i + ln]
            i += ln
        elif wire == 0:
            v, i = _read_varint(mv, i)
            yield field, v
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            yield field, None
        else:
            raise ValueError(f"wire type {wire} of field {field}")
    if i != len(mv):
        raise ValueError("message ends inside a field")


def _parse_upload_chunk(buf: bytes, max_header_bytes: int = 1 << 20) -> WireChunk:
    """An UploadChunk, its data a view of `buf`. A header over `max_header_bytes` is refused
    unparsed: this runs before the token is checked, so its cost must stay bounded."""
    mv = memoryview(buf)
    headers, data, offset = [], mv[0:0], 0
    try:
        for field, v in _fields(mv, _CHUNK_FIELDS):
            if field == 1 and isinstance(v, memoryview):
                headers.append(v)
            elif field == 2 and isinstance(v, memoryview):
                data = v  # last one wins, as protobuf does
            elif field == 3 and isinstance(v, int):
                offset = v
        header = None
        if headers:  # repeated occurrences of a message field merge, as protobuf does
            size = sum(len(v) for v in headers)
            if size > max_header_bytes:
                raise ValueError(f"update header of {size} bytes, over this server's limit of {max_header_bytes}")
            header = pb.UpdateHeader.FromString(b"".join(headers))
    except Exception as e:  # DecodeError or ValueError: refused by the servicer as INVALID_ARGUMENT
        return WireChunk(None, mv[0:0], 0, error=f"malformed UploadChunk: {e}")
    return WireChunk(header, data, offset)


def _parse_upload_pack(buf: bytes, max_header_bytes: int = 1 << 20) -> list[WireChunk]:
    """An UploadPack: its chunks, each parsed like an UploadChunk (views of `buf`, no copy)."""
    out: list[WireChunk] = []
    try:
        for field, v in _fields(memoryview(buf), _PACK_ENTRIES):
            if field == 1 and isinstance(v, memoryview):
                if not len(v):
                    raise ValueError("an empty chunk")
                c = _parse_upload_chunk(v, max_header_bytes)
                if c.error:
                    raise ValueError(c.error)
                out.append(c)
    except ValueError as e:  # the whole message is refused, as protobuf would refuse to parse it
        return [WireChunk(None, memoryview(b""), 0, error=f"malformed UploadPack: {e}")]
    return out


# An UploadChunk has a header, data and an offset (a few more fields are tolerated: unknown
# ones from newer clients, a header sent in parts); a pack holds at most this many chunks
# (~1 MB of updates of at least a few hundred bytes each).
_CHUNK_FIELDS, _PACK_ENTRIES = 16, 4096


def _pack_frames(frames: Iterable[bytes], limit: int = CHUNK_BYTES) -> Iterator[bytes]:
    """UploadPack messages of about `limit` bytes from framed UploadChunk messages."""
    parts, size = [], 0
    for f in frames:
        if parts and (size + len(f) > limit or len(parts) >= 3 * _PACK_ENTRIES):
            yield b"".join(parts)
            parts, size = [], 0
        parts += [b"\x0a", _varint(len(f)), f]
        size += len(f) + 6
    if parts:
        yield b"".join(parts)


def _to_wire(m) -> bytes:
    """Request serializer: pre-framed bytes as they are, protobuf messages serialized."""
    return m if isinstance(m, bytes) else m.SerializeToString()


def _frame_chunk(data, offset: int, header: bytes = b"") -> bytes:
    parts = []
    if header:
        parts += [b"\x0a", _varint(len(header)), header]
    if len(data):
        parts += [b"\x12", _varint(len(data)), data]
    if offset:
        parts += [b"\x18", _varint(offset)]
    return b"".join(parts)


def _framed_len(n: int, offset: int, header_len: int = 0) -> int:
    out = 1 + len(_varint(header_len)) + header_len if header_len else 0
    out += 1 + len(_varint(n)) + n if n else 0
    return out + (1 + len(_varint(offset)) if offset else 0)


@dataclass(frozen=True)
class WireUpload:
    """One update ready to stream: its header and its payload bytes as ~1 MB views (no copy of
    the payloads). `messages()` frames each chunk as it is sent, one copy into the bytes gRPC
    sends, with the header in the first chunk as `upload_messages` does (a separate header
    message would cost every upload one more gRPC event on both sides). Memory beyond the
    payloads is O(chunks), so updates over 2 GiB stream like small ones. `encode_upload` builds it."""

    header: object  # pb.UpdateHeader, digest included
    chunks: tuple  # memoryview or bytes, in stream order

    def messages(self, token: str | None = None) -> Iterator[bytes]:
        h = self.header
        if token is not None:  # UploadBatch carries each update's token in its header
            h = pb.UpdateHeader()
            h.CopyFrom(self.header)
            h.token = token
        first = self.chunks[0] if self.chunks else b""
        yield _frame_chunk(first, 0, h.SerializeToString())
        offset = len(first)
        for c in self.chunks[1:]:
            yield _frame_chunk(c, offset)
            offset += len(c)

    def with_digest(self, kind: int) -> "WireUpload":
        """The same update with its digest in another `digest_kind` (servers from before
        digest_kind verify CRC-32 only)."""
        if self.header.digest_kind == kind:
            return self
        d = new_digest(kind)
        for c in self.chunks:
            d.update(c)
        h = pb.UpdateHeader()
        h.CopyFrom(self.header)
        h.digest, h.digest_kind = d.digest(), kind
        return WireUpload(h, self.chunks)

    def with_header(self, header) -> "WireUpload":
        """The same payload under another header (the load benchmark's many clients)."""
        return WireUpload(header, self.chunks)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (framing included), without framing anything."""
        total, offset = 0, 0
        for i, c in enumerate(self.chunks or (b"",)):
            total += _framed_len(len(c), offset, self.header.ByteSize() if i == 0 else 0)
            offset += len(c)
        return total


def encode_upload(
    *, job_id: str, round: int, client_id: int, weight: float, tensors: Iterable[tuple[str, Payload]],
    attempt: int = 0, subnet_seed: int = 0, keep_rate: float = 1.0, metrics: Mapping[str, float] | None = None,
    chunk_bytes: int = CHUNK_BYTES, weights: bool = False,
) -> WireUpload:
    """`upload_messages` for the hot path: the same stream on the wire, no copy until it is sent."""
    tensors = list(tensors)
    header = pb.UpdateHeader(
        job_id=job_id, round=round, client_id=client_id, attempt=attempt, weight=weight,
        subnet_seed=subnet_seed, keep_rate=keep_rate, metrics=dict(metrics or {}), weights=weights,
    )
    header.tensors.MergeFrom(_metas(tensors))
    chunks, h = [], new_digest()
    for data in _chunked((memoryview(p.data).cast("B") for _, p in tensors), chunk_bytes):
        h.update(data)
        chunks.append(data)
    header.digest, header.digest_kind = h.digest(), DIGEST_CRC32C
    return WireUpload(header, tuple(chunks))


def upload_nbytes_many(
    *, job_id: str, round: int, attempt: int, tensors: list[tuple[str, Payload]],
    clients: Iterable[tuple[int, float, Mapping[str, float]]], chunk_bytes: int = CHUNK_BYTES,
) -> list[int]:
    """`encode_upload(...).nbytes` of many clients' updates that share `tensors`' metadata and
    payload sizes, one per (client id, weight, metrics), without digesting or copying anything:
    one header is built and only the fields that differ between clients are set again."""
    header = pb.UpdateHeader(job_id=job_id, round=round, attempt=attempt, keep_rate=1.0)
    header.tensors.MergeFrom(_metas(tensors))
    header.digest, header.digest_kind = new_digest().digest(), DIGEST_CRC32C  # a digest's size is fixed
    sizes, total, offset = [], sum(p.nbytes for _, p in tensors), 0
    while offset < total or not sizes:
        sizes.append(min(chunk_bytes, total - offset))
        offset += sizes[-1]
    rest = sum(_framed_len(n, i * chunk_bytes) for i, n in enumerate(sizes) if i)
    # A header's size depends on a client only through its id's varint length (0 for id 0, which
    # proto3 leaves out), which metric keys it has, and which of its doubles are +0.0 (left out
    # too): one ByteSize per such shape, not per client.
    out, known = [], {}
    for cid, weight, metrics in clients:
        shape = (cid != 0 and _varint_len(cid), _is_pos_zero(weight), tuple((k, _is_pos_zero(v)) for k, v in metrics.items()))
        n = known.get(shape)
        if n is None:
            header.client_id, header.weight = cid, weight
            header.metrics.clear()
            header.metrics.update(metrics)
            n = known[shape] = _framed_len(sizes[0], 0, header.ByteSize()) + rest
        out.append(n)
    return out


def _varint_len(v: int) -> int:
    """Bytes of an int64 field's varint (a negative one takes 10)."""
    return 10 if v < 0 else max(1, (v.bit_length() + 6) // 7)


def _is_pos_zero(x: float) -> bool:
    return x == 0.0 and math.copysign(1.0, x) > 0


def _wire(update, token: str | None = None) -> Iterable:
    return update.messages(token) if isinstance(update, WireUpload) else update


def wire_nbytes(update) -> int:
    """Bytes on the wire of an update (a `WireUpload` or a message list)."""
    return update.nbytes if isinstance(update, WireUpload) else sum(m.ByteSize() for m in update)


_STUBS: "weakref.WeakKeyDictionary[grpc.Channel, tuple]" = weakref.WeakKeyDictionary()


def _upload_stubs(channel: grpc.Channel) -> tuple:
    """(Upload, UploadBatch) callables of a channel, made once per channel."""
    stubs = _STUBS.get(channel)
    if stubs is None:
        stubs = _STUBS[channel] = (
            channel.stream_unary(_UPLOAD, request_serializer=_to_wire, response_deserializer=pb.UploadAck.FromString),
            channel.stream_unary(_UPLOAD_BATCH, request_serializer=_to_wire,
                                 response_deserializer=pb.UploadBatchAck.FromString),
            channel.stream_unary(_UPLOAD_PACKED, request_serializer=_to_wire,
                                 response_deserializer=pb.UploadBatchAck.FromString),
            channel.unary_unary(_UPLOAD_ONE, request_serializer=_to_wire, response_deserializer=pb.UploadAck.FromString),
        )
    return stubs


_SERVICE = "fedray.v1.Aggregation"
_UPLOAD, _UPLOAD_BATCH, _UPLOAD_PACKED, _UPLOAD_ONE = (
    f"/{_SERVICE}/{m}" for m in ("Upload", "UploadBatch", "UploadPacked", "UploadOne"))
# Updates up to this size go packed (UploadPacked): one gRPC message carries several.
PACK_BELOW = 256 << 10
# Channels whose server has no UploadPacked (an older fedray): they get UploadBatch.
_NO_PACKED: "weakref.WeakSet[grpc.Channel]" = weakref.WeakSet()
# Channels whose server has no UploadOne (an older fedray): one-message updates stream (Upload).
_NO_ONE: "weakref.WeakSet[grpc.Channel]" = weakref.WeakSet()


DIGEST_CRC32, DIGEST_CRC32C = 0, 1


class _Crc32:
    """Incremental CRC-32 (zlib): what clients before `digest_kind` sent; about 2 GB/s here."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


class _Crc32c:
    """Incremental CRC-32C (google-crc32c, SSE4.2): about 20 GB/s here, against 2 GB/s for zlib's
    CRC-32 (0.05 against 0.5 ms per MB on the server). It catches corruption in transit;
    authenticity comes from the token, not from this checksum."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data) -> None:
        view = np.frombuffer(data, np.uint8)  # zero-copy; the library takes read-only buffers only
        view.flags.writeable = False
        self._crc = google_crc32c.extend(self._crc, view)

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


_DIGESTS = {DIGEST_CRC32: _Crc32, DIGEST_CRC32C: _Crc32c}


def new_digest(kind: int = DIGEST_CRC32C):
    """The upload checksum of `digest_kind` `kind` (default: CRC-32C, what fedray sends).

    Raises:
        PayloadError: an unknown kind.
    """
    try:
        return _DIGESTS[kind]()
    except KeyError:
        raise PayloadError(f"unknown digest_kind {kind}; this server knows {sorted(_DIGESTS)}") from None


@dataclass(frozen=True)
class BatchResult:
    client_id: int
    accepted: bool
    code: grpc.StatusCode
    message: str
    wire_bytes: int


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def call_upload_batch(channel: grpc.Channel, updates: list[tuple[object, str]], *, timeout: float = 120.0) -> list[BatchResult]:
    """Stream several updates (each a `WireUpload`, or a message list from `upload_messages`,
    with its client's token) in one call; return one result per update, in order. One refused
    update does not affect the others. Small `WireUpload`s (under PACK_BELOW bytes each) go
    packed, several per gRPC message (UploadPacked; UploadBatch against a server without it).

    Raises:
        grpc.RpcError: the call itself failed (service unreachable, deadline).
    """
    def flat(old_server: bool = False):
        for update, token in updates:
            if isinstance(update, WireUpload):
                # a server without UploadPacked predates digest_kind: it verifies CRC-32
                yield from (update.with_digest(DIGEST_CRC32) if old_server else update).messages(token)
                continue
            first = pb.UploadChunk()
            first.CopyFrom(update[0])
            first.header.token = token
            yield first
            yield from update[1:]

    if not updates:
        return []
    # The call's own credentials (checked before the server reads the stream): the first
    # update's client; each update is then checked against the token in its header.
    md = credentials(_update_job(updates[0][0]), _update_client(updates[0][0]), updates[0][1])
    stubs = _upload_stubs(channel)
    packed = channel not in _NO_PACKED and all(
        isinstance(u, WireUpload) and sum(len(c) for c in u.chunks) < PACK_BELOW for u, _ in updates)
    if packed:
        try:
            ack = stubs[2](_pack_frames(flat()), timeout=timeout, metadata=md)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            _NO_PACKED.add(channel)
            ack = stubs[1](flat(old_server=True), timeout=timeout, metadata=md)
    else:
        ack = stubs[1](flat(old_server=channel in _NO_PACKED), timeout=timeout, metadata=md)
    # Results pair with updates by client id, not position: a server may answer fewer (one
    # result for a malformed pack, a long batch cut at the server's max_batch_updates).
    ids = {_update_client(u) for u, _ in updates}
    by_id: dict[int, list] = {}
    for r in ack.results:
        by_id.setdefault(r.client_id if r.client_id in ids else -1, []).append(r)
    other = by_id.get(-1, [])  # results that name none of these clients (e.g. a malformed pack's)
    out = []
    for update, _ in updates:
        cid = _update_client(update)
        mine = by_id.get(cid)
        if mine:
            r = mine.pop(0)
            out.append(BatchResult(cid, r.accepted, _CODES.get(r.code, grpc.StatusCode.UNKNOWN), r.message,
                                   wire_nbytes(update)))
        elif other:
            out.append(BatchResult(cid, False, _CODES.get(other[0].code, grpc.StatusCode.UNKNOWN) if other[0].code
                                   else grpc.StatusCode.UNKNOWN, other[0].message, wire_nbytes(update)))
        else:
            out.append(BatchResult(cid, False, grpc.StatusCode.UNAVAILABLE,
                                   "the server sent no result for this update (it did not read it); send it again",
                                   wire_nbytes(update)))
    return out


def _update_client(update) -> int:
    return int(update.header.client_id if isinstance(update, WireUpload) else update[0].header.client_id)


def _update_job(update) -> str:
    return update.header.job_id if isinstance(update, WireUpload) else update[0].header.job_id


def _with_first_header(messages):
    """(the update's header, the same messages): an upload's credentials name the job and client
    of its first chunk. Any iterable works (a generator is read one message ahead)."""
    if isinstance(messages, WireUpload):
        return messages.header, messages
    if not isinstance(messages, (list, tuple)):
        it = iter(messages)
        first = next(it, None)
        messages = it if first is None else itertools.chain((first,), it)
    else:
        first = messages[0] if messages else None
    if isinstance(first, (bytes, bytearray, memoryview)):  # pre-framed
        first = _parse_upload_chunk(first)
    header = first.header if first is not None and first.HasField("header") else pb.UpdateHeader()
    return header, messages


def call_upload(stub_channel: grpc.Channel, messages, *, token: str, timeout: float = 60.0,
                job_id: str | None = None, client_id: int | None = None) -> dict:
    """Send one update (a `WireUpload`, or the messages of `upload_messages`, any iterable) to
    the service; return the ack as a dict and the bytes sent. A `WireUpload` of one chunk goes
    in one unary call (UploadOne), anything else as a stream (Upload). The call's credentials name
    `job_id` and `client_id`, by default the job and client of the update's header.

    Raises:
        grpc.RpcError: the service rejected the update (the status code says why).
    """
    sent = 0

    if isinstance(messages, WireUpload) and stub_channel in _NO_PACKED:  # an older server: CRC-32
        messages = messages.with_digest(DIGEST_CRC32)
    header, messages = _with_first_header(messages)
    md = credentials(header.job_id if job_id is None else job_id,
                     header.client_id if client_id is None else client_id, token)
    if (isinstance(messages, WireUpload) and len(messages.chunks) <= 1 and stub_channel not in _NO_ONE
            and stub_channel not in _NO_PACKED):
        # one message: a unary call (UploadOne), no request stream (~0.3 ms less a call, both sides)
        (one,) = messages.messages()
        try:
            ack = _upload_stubs(stub_channel)[3](one, timeout=timeout, metadata=md)
            return _ack_dict(ack, len(one))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            _NO_ONE.add(stub_channel)

    def framed():  # any iterable of messages (a generator too); counts the bytes as they go
        nonlocal sent
        for m in _wire(messages):
            b = _to_wire(m)
            sent += len(b)
            yield b

    return _ack_dict(_upload_stubs(stub_channel)[0](framed(), timeout=timeout, metadata=md), sent)


def _ack_dict(ack, sent: int) -> dict:
    return {
        "accepted": ack.accepted,
        "bytes_received": ack.bytes_received,
        "round": ack.round,
        "client_id": ack.client_id,
        "wire_bytes": sent,
    }


# -- downloads ----------------------------------------------------------------------------------


def _model_messages(job_id: str, stage: ModelStage, chunk_bytes: int) -> Iterator:
    header = pb.ModelHeader(
        job_id=job_id, round=stage.round, stage=stage.stage, num_stages=stage.num_stages,
        tensors=[_meta(n, p) for n, p in stage.tensors],
    )
    first = True
    offset = 0
    for data in _chunked((memoryview(p.data).cast("B") for _, p in stage.tensors), chunk_bytes):
        msg = pb.ModelChunk(data=bytes(data), offset=offset)
        if first:
            msg.header.CopyFrom(header)
            first = False
        offset += len(msg.data)
        yield msg
    if first:
        yield pb.ModelChunk(header=header)


def call_download(
    channel: grpc.Channel, *, job_id: str, round: int, client_id: int, token: str,
    max_stage: int | None = None, timeout: float = 60.0,
) -> list[ModelStage]:
    """Download the round's model, stage by stage.

    Raises:
        grpc.RpcError: the service refused (wrong job, round not open, bad token).
        PayloadError: the stream is inconsistent with its headers.
    """
    stub = pb_grpc.AggregationStub(channel)
    req = pb.DownloadRequest(job_id=job_id, round=round, client_id=client_id)
    if max_stage is not None:
        req.max_stage = max_stage
    stages: list[ModelStage] = []
    header = None
    buf = bytearray()

    def finish():
        if header is None:
            return
        entries = _entries(header.tensors)
        if len(buf) != sum(e.nbytes for e in entries):
            raise PayloadError(f"model stage {header.stage}: got {len(buf)} bytes, header declares more or less")
        mv, off, out = memoryview(bytes(buf)), 0, []
        for e in entries:
            out.append((e.name, _with_data(e.payload, mv[off : off + e.nbytes])))
            off += e.nbytes
        stages.append(ModelStage(header.round, header.stage, header.num_stages, tuple(out)))

    for msg in stub.Download(req, timeout=timeout, metadata=credentials(job_id, client_id, token)):
        if msg.HasField("header"):
            finish()
            header, buf = msg.header, bytearray()
        buf += msg.data
    finish()
    return stages


def _with_data(p: Payload, data) -> Payload:
    return Payload(p.codec, p.version, p.dtype, p.shape, p.params, data)


def call_get_job(channel: grpc.Channel, *, job_id: str, client_id: int, token: str, timeout: float = 10.0) -> JobInfo:
    r = pb_grpc.AggregationStub(channel).GetJob(
        pb.JobRequest(job_id=job_id, client_id=client_id), timeout=timeout,
        metadata=credentials(job_id, client_id, token),
    )
    return JobInfo(r.job_id, r.round, r.round_open, r.finished, r.num_rounds, r.spec_json, tuple(r.shard_addresses))


def call_health(channel: grpc.Channel, timeout: float = 10.0) -> HealthInfo:
    r = pb_grpc.AggregationStub(channel).Health(pb.HealthRequest(), timeout=timeout)
    return HealthInfo(r.status, r.job_id, r.round, r.updates_committed, r.bytes_received)


# -- server side --------------------------------------------------------------------------------


class RpcContext(Protocol):
    def invocation_metadata(self): ...


class AggregationHandler(Protocol):
    """The plain handler behind the service; it never sees protobuf."""

    def upload(self, header: UpdateHeader, chunks: Iterator[tuple[int, bytes]], token: str) -> tuple[int, int]:
        """Consume the update; return (round, bytes received). Raises domain errors."""

    def download(self, job_id: str, round: int, client_id: int, max_stage: int | None, token: str) -> list[ModelStage]: ...

    def health(self) -> HealthInfo: ...

    def authenticate(self, job_id: str, client_id: int, token: str) -> None:
        """Raise a domain error unless `token` is valid for (job_id, client_id)."""

    def get_job(self, job_id: str, client_id: int, token: str) -> JobInfo: ...


def _token(context) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == TOKEN_METADATA_KEY:
            return v
    return ""


class _CredentialError(Exception):
    """A call's metadata lacks credentials or holds malformed ones (UNAUTHENTICATED)."""


def _metadata_credentials(metadata) -> tuple[str, int, str]:
    """(job id, client id, token) from a call's metadata (gRPC bounds its size, 8 KiB by default).

    Raises:
        _CredentialError: one is missing, or the client id is not a decimal integer.
    """
    job = cid = token = None
    for k, v in metadata or ():
        if k == TOKEN_METADATA_KEY:
            token = v
        elif k == JOB_METADATA_KEY:
            job = v
        elif k == CLIENT_METADATA_KEY:
            cid = v
    if not token:
        raise _CredentialError(f"no token: every call but Health carries the {JOB_METADATA_KEY}, "
                               f"{CLIENT_METADATA_KEY} and {TOKEN_METADATA_KEY} metadata")
    if job is None or cid is None:
        raise _CredentialError(f"a {TOKEN_METADATA_KEY} needs the {JOB_METADATA_KEY} and {CLIENT_METADATA_KEY} "
                               "metadata next to it")
    if not (cid.isascii() and cid.isdigit() and len(cid) <= 20):
        raise _CredentialError(f"{CLIENT_METADATA_KEY} must be the client id in decimal, not {_quote(cid)}")
    return urllib.parse.unquote(job), int(cid), token


def _quote(x: str, n: int = 64) -> str:
    return repr(x) if len(x) <= n else f"{x[: n - 16]!r}...({len(x)} long)"


class _CredentialGate(grpc.GenericRpcHandler):
    """Serves the Aggregation methods; every one but Health only to a call whose metadata
    carries valid credentials (`credentials`). The check runs on the call's headers, before gRPC
    receives a byte of its body: a refused call's body is never buffered or parsed, and its
    stream is reset after the status (HTTP/2 lets a client push one stream window, 64 KiB here,
    before the reset arrives)."""

    def __init__(self, handlers: dict, authenticate: Callable[[str, int, str], None],
                 status_of: Callable[[Exception], grpc.StatusCode | None], open_methods: Iterable[str] = ("Health",)):
        self._handlers = {f"/{_SERVICE}/{k}": v for k, v in handlers.items()}
        self._open = {f"/{_SERVICE}/{k}" for k in open_methods}
        self._authenticate, self._status_of = authenticate, status_of

    def service(self, details):
        handler = self._handlers.get(details.method)
        if handler is None or details.method in self._open:
            return handler
        try:
            self._authenticate(*_metadata_credentials(details.invocation_metadata))
        except _CredentialError as e:
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except Exception as e:
            code = self._status_of(e)
            if code is None:
                raise
            return _refusal(code, _message(str(e)))
        return handler


def _refusal(code: grpc.StatusCode, details: str):
    """A handler that answers `code` without reading the request: a request-streaming handler, so
    that gRPC starts it without receiving a message first (whatever the method's own shape)."""
    def refuse(request_iterator, context):
        context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)


class _Servicer(pb_grpc.AggregationServicer):
    """Thin adapter: parse, check the token first, call the handler, serialize. Every stream is
    watched (`watchdog`: an idle or endless one is cancelled); messages quote client input only
    truncated (`_MAX_MESSAGE`)."""

    def __init__(self, handler: AggregationHandler, job_id: str, status_of: Callable[[Exception], grpc.StatusCode | None],
                 watchdog=None, max_batch_updates: int = 4096):
        self._h = handler
        self._job_id = job_id
        self._status_of = status_of
        self._wd = watchdog
        self._max_batch = max_batch_updates

    @contextlib.contextmanager
    def _watch(self, context):
        if self._wd is None:
            yield None
            return
        key, w = self._wd.open(context)
        try:
            yield w
        finally:
            self._wd.close(key)

    def _requests(self, w, it):
        return it if w is None else w.requests(it, _progress)

    def _abort(self, context, e: Exception):
        if isinstance(e, grpc.RpcError) and not context.is_active():
            # The call was cancelled (by the client, or by the watchdog): nobody to answer. gRPC
            # recognises the error its request iterator raised and ends the call quietly.
            raise e
        code = self._status_of(e)
        if code is None:
            raise e
        hint = getattr(e, "retry_after_ms", None)
        if hint is not None:
            context.set_trailing_metadata(((PUSHBACK_KEY, str(int(hint))), (RETRY_AFTER_KEY, str(int(hint)))))
        context.abort(code, _message(str(e)))

    def Upload(self, request_iterator, context):
        with self._watch(context) as w:
            request_iterator = self._requests(w, request_iterator)
            try:
                return self._upload(next(request_iterator, None), request_iterator, context)
            except Exception as e:  # mapped to a status in one place: status_of
                self._abort(context, e)

    def UploadOne(self, request, context):
        """Upload of one message: nothing to watch, gRPC hands it over whole."""
        try:
            return self._upload(request, (), context)
        except Exception as e:
            self._abort(context, e)

    def _upload(self, first, rest, context):
        first = _valid(first)
        if first is None or not first.HasField("header"):
            raise PayloadError("the first chunk of an upload must carry the update header")
        h = first.header
        token = _token(context)
        self._h.authenticate(h.job_id, h.client_id, token)  # before anything else is converted
        header = _header(h)

        def chunks():
            yield first.offset, first.data
            for msg in rest:
                if _valid(msg).HasField("header"):
                    raise PayloadError("only the first chunk of an upload may carry a header")
                yield msg.offset, msg.data

        rnd, received = self._h.upload(header, chunks(), token)
        return pb.UploadAck(accepted=True, bytes_received=received, round=rnd, client_id=h.client_id)

    def UploadBatch(self, request_iterator, context):
        with self._watch(context) as w:
            return self._upload_batch(self._requests(w, request_iterator), context)

    def _upload_batch(self, request_iterator, context):
        it = _Peekable(request_iterator)
        results = []
        try:
            while len(results) < self._max_batch and (first := it.next()) is not None:
                cid = first.header.client_id if first.HasField("header") else 0
                try:
                    _valid(first)
                    if not first.HasField("header"):
                        raise PayloadError("each update of a batch must start with a chunk carrying its header")
                    h = first.header
                    self._h.authenticate(h.job_id, h.client_id, h.token)
                    header = _header(h)
                    _, received = self._h.upload(header, _update_chunks(first, it), h.token)
                    results.append(pb.UploadResult(client_id=cid, accepted=True, bytes_received=received))
                except grpc.RpcError:
                    raise
                except Exception as e:
                    # An unexpected error refuses this update only (INTERNAL), so that the acks of the
                    # updates already committed in the batch still reach the client.
                    code = self._status_of(e) or grpc.StatusCode.INTERNAL
                    msg = str(e) if code != grpc.StatusCode.INTERNAL else f"internal error: {type(e).__name__}: {e}"
                    results.append(pb.UploadResult(client_id=cid, accepted=False, code=code.value[0],
                                                   message=_message(msg, _BATCH_MESSAGE)))
                while it.peek() is not None and not it.peek().HasField("header"):  # rest of a refused update
                    it.next()
        except grpc.RpcError as e:  # the stream broke or was cancelled: nobody reads the reply
            self._abort(context, e)
        return pb.UploadBatchAck(results=results)

    def UploadPacked(self, request_iterator, context):
        with self._watch(context) as w:
            packs = self._requests(w, request_iterator)
            return self._upload_batch((c for pack in packs for c in pack), context)

    def Download(self, request, context):
        with self._watch(context) as w:
            try:
                stages = self._h.download(
                    request.job_id, request.round, request.client_id,
                    request.max_stage if request.HasField("max_stage") else None, _token(context),
                )
            except Exception as e:
                self._abort(context, e)
                return
            try:
                msgs = (m for stage in stages for m in _model_messages(self._job_id, stage, CHUNK_BYTES))
                yield from (msgs if w is None else w.responses(msgs))
            finally:
                close = getattr(stages, "close", None)
                if close is not None:
                    close()

    def GetJob(self, request, context):
        try:
            i = self._h.get_job(request.job_id, request.client_id, _token(context))
        except Exception as e:
            self._abort(context, e)
            return None
        return pb.JobInfo(
            job_id=i.job_id, round=i.round, round_open=i.round_open, finished=i.finished, num_rounds=i.num_rounds,
            spec_json=i.spec_json, shard_addresses=list(i.shard_addresses),
        )

    def Health(self, request, context):
        # No credentials, so nothing but the status: not the job id, round or counters.
        return pb.HealthReply(status=self._h.health().status)


# Status messages and batch result messages quote client input only truncated: a reply must stay
# small (a 1 MiB job id echoed back overflows the client's receive limit).
_MAX_MESSAGE, _BATCH_MESSAGE = 1024, 200


def _message(msg: str, limit: int = _MAX_MESSAGE) -> str:
    return msg if len(msg) <= limit else msg[: limit - 20] + f"... ({len(msg)} chars)"


def _progress(msg) -> bool:
    """Whether a received message moves its upload on (an empty chunk does not)."""
    if isinstance(msg, list):  # an UploadPack
        return any(_progress(c) for c in msg)
    return bool(getattr(msg, "error", None)) or msg.HasField("header") or len(msg.data) > 0


class _Peekable:
    def __init__(self, it) -> None:
        self._it, self._next, self._has = it, None, False

    def peek(self):
        if not self._has:
            self._next, self._has = next(self._it, None), True
        return self._next

    def next(self):
        v = self.peek()
        self._has = False
        return v


def _update_chunks(first, it: _Peekable):
    yield first.offset, first.data
    while it.peek() is not None and not it.peek().HasField("header"):
        m = _valid(it.next())
        yield m.offset, m.data


def _valid(msg):
    """A received chunk, or PayloadError when its bytes did not parse."""
    if msg is not None and getattr(msg, "error", None):
        raise PayloadError(msg.error)
    return msg


def add_aggregation_service(
    server: grpc.Server, handler: AggregationHandler, *, job_id: str,
    status_of: Callable[[Exception], grpc.StatusCode | None], watchdog=None, max_header_bytes: int = 1 << 20,
    max_batch_updates: int = 4096,
) -> None:
    """Register `handler` as the Aggregation service on `server`.

    Every method but Health is served only to calls whose metadata carries valid credentials
    (`credentials`; `handler.authenticate` checks them), before the request's body is read.
    `status_of` maps a domain exception to its gRPC status (None re-raises it as INTERNAL).
    `watchdog` (orchestrator.streams.StreamWatchdog) ends idle streams; upload headers over
    `max_header_bytes` are refused unparsed; an UploadBatch call answers at most
    `max_batch_updates` updates.
    """
    sv = _Servicer(handler, job_id, status_of, watchdog, max_batch_updates)
    parse_chunk = functools.partial(_parse_upload_chunk, max_header_bytes=max_header_bytes)
    parse_pack = functools.partial(_parse_upload_pack, max_header_bytes=max_header_bytes)
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        # The upload streams parse their chunks without copying the payload bytes (WireChunk).
        "Upload": grpc.stream_unary_rpc_method_handler(
            sv.Upload, request_deserializer=parse_chunk, response_serializer=pb.UploadAck.SerializeToString),
        "UploadBatch": grpc.stream_unary_rpc_method_handler(
            sv.UploadBatch, request_deserializer=parse_chunk,
            response_serializer=pb.UploadBatchAck.SerializeToString),
        "UploadPacked": grpc.stream_unary_rpc_method_handler(
            sv.UploadPacked, request_deserializer=parse_pack,
            response_serializer=pb.UploadBatchAck.SerializeToString),
        "UploadOne": unary(sv.UploadOne, request_deserializer=parse_chunk,
                           response_serializer=pb.UploadAck.SerializeToString),
        "Download": grpc.unary_stream_rpc_method_handler(
            sv.Download, request_deserializer=pb.DownloadRequest.FromString,
            response_serializer=pb.ModelChunk.SerializeToString),
        "Health": unary(sv.Health, request_deserializer=pb.HealthRequest.FromString,
                        response_serializer=pb.HealthReply.SerializeToString),
        "GetJob": unary(sv.GetJob, request_deserializer=pb.JobRequest.FromString,
                        response_serializer=pb.JobInfo.SerializeToString),
    }
    declared = {m.name for m in pb.DESCRIPTOR.services_by_name["Aggregation"].methods}
    if declared != set(handlers):  # a method added to the .proto must be served here too
        raise RuntimeError(f"Aggregation methods {sorted(declared)} != served {sorted(handlers)}")
    server.add_generic_rpc_handlers((_CredentialGate(handlers, handler.authenticate, status_of),))
