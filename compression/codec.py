"""The `Codec` interface and the registry of codecs by name."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import numpy as np
import torch

from .accumulate import ScaledAdd
from .payload import Payload, PayloadError, check_shape

__all__ = [
    "Codec",
    "CodecContext",
    "UnknownCodecError",
    "available_codecs",
    "decode_checked",
    "get_codec",
    "register_codec",
]


class UnknownCodecError(PayloadError, KeyError):
    """No codec is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class CodecContext:
    """Per-call inputs a codec may use besides the tensor.

    Attributes:
        seed: seed for stochastic codecs, derived by the caller from (job seed, round, client).
        state: the caller's per-client state object for stateful codecs (error feedback,
            warm starts); codecs that keep no state ignore it.
        key: name of the tensor within the model, used to key per-tensor state.
    """

    seed: int = 0
    state: Any = None
    key: str = ""

    def generator(self) -> np.random.Generator:
        """A numpy generator seeded from `seed` and `key`: the same inputs give the same draws."""
        return np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, _key_hash(self.key)])

    def torch_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + _key_hash(self.key)) & 0x7FFFFFFFFFFFFFFF)
        return g


def _key_hash(key: str) -> int:
    # Stable across processes (Python's hash() of str is salted per process).
    h = 1469598103934665603
    for b in key.encode():
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


class Codec(abc.ABC):
    """Encodes a tensor into a `Payload` and decodes it back.

    Subclasses set `name` and `version` through `register_codec`, take their configuration as
    keyword arguments in `__init__` (validated there), and keep `encode` and `decode` side by
    side. `decode` must validate the payload and raise `PayloadError` on anything malformed.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    # True where `decode` itself refuses any payload whose values would not be finite (it bounds
    # scales and steps, which costs O(groups)), so `decode_checked` can skip its O(n) finiteness pass.
    finite_output: ClassVar[bool] = False
    # True where `encode` reads or writes `ctx.state` (per-client memory kept across rounds, e.g.
    # error-feedback residuals): the caller then keeps one `CodecState` per client and encodes
    # each client on its own. Wrappers report their inner codec's (an instance property).
    stateful: ClassVar[bool] = False

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, ctx: CodecContext = CodecContext()) -> Payload: ...

    @abc.abstractmethod
    def decode(self, p: Payload, ctx: CodecContext = CodecContext()) -> torch.Tensor: ...

    def decode_into(self, p: Payload, out: torch.Tensor, ctx: CodecContext = CodecContext()) -> torch.Tensor:
        """Decode `p` into `out`, a contiguous float32 CPU tensor of `p`'s element count (any
        shape), and return `out` viewed as `p.shape`. A server reuses one buffer per tensor this
        way: no allocation, no first-touch page faults. On `PayloadError` the contents of `out`
        are unspecified.

        Raises:
            PayloadError: the payload is malformed.
            ValueError: `out` is not a contiguous float32 CPU tensor of the right size.
        """
        n = self._check(p)
        flat = _out_view(out, n, self.name)
        if type(self)._decode_flat is Codec._decode_flat:  # no in-place kernel: decode, then copy
            np.copyto(flat, self.decode(p, ctx).detach().reshape(-1).to(torch.float32).numpy())
        else:
            self._decode_flat(p, n, flat, ctx)
        return out.view(p.shape)

    def fold(self, p: Payload, ctx: CodecContext = CodecContext(), *,
             scratch: Callable[[], torch.Tensor] | None = None) -> Callable[[torch.Tensor, float], None]:
        """Validate (and where needed decode) `p` now; return `add(acc, alpha)`, which adds alpha
        times the decoded tensor into `acc`, a float64 tensor of `p`'s element count, and cannot
        fail. The aggregation service checks every tensor of an upload this way while it streams
        and runs the adds only when the upload commits.

        This default decodes now, into `scratch()` when given (a float32 buffer the caller keeps
        until the add has run). Codecs whose values are a scale times their codes override it to
        add straight from the payload bytes, with no float32 copy.

        Raises:
            PayloadError: the payload is malformed or decodes to NaN or infinity.
        """
        y = decode_checked(self, p, ctx, out=scratch() if scratch is not None else None).reshape(-1)
        if p.dtype in _NARROW:  # the values the client's tensor held: rounded to its dtype
            y = y.to(_NARROW[p.dtype]).to(torch.float32)
        return ScaledAdd(y)

    def fold_many(self, payloads: Sequence[Payload], alphas: Sequence[float], acc: torch.Tensor) -> None:
        """Add sum_i alphas[i] * decode(payloads[i]) into `acc` (float64, the payloads' element
        count), in order: the same sum as `fold(p)(acc, alpha)` one payload after the other.
        Every payload is checked before anything is added (a worker folding its own clients'
        updates, `resources.worker_reduce`). Codecs override it to add all of them in a few passes.

        Raises:
            PayloadError: a payload is malformed or decodes to NaN or infinity.
        """
        for add, alpha in [(self.fold(p), a) for p, a in zip(payloads, alphas)]:
            add(acc, alpha)

    def folder(self, meta: Payload) -> Callable[..., Callable[[torch.Tensor, float], None]]:
        """`fold` in two steps, for a server that sees the same tensor metadata on every upload:
        whatever depends on `meta` alone (codec, version, dtype, shape, params) is checked here,
        once; the returned `prepare(data, scratch=None)` checks the bytes and returns the add.

        Raises:
            PayloadError: the metadata is malformed (`prepare` raises it for bad bytes).
        """
        check_shape(meta)

        def prepare(data, scratch=None):
            return self.fold(Payload(meta.codec, meta.version, meta.dtype, meta.shape, meta.params, data),
                             scratch=scratch)

        return prepare

    def _decode_flat(self, p: Payload, n: int, out: np.ndarray, ctx: CodecContext) -> None:
        """Hook for codecs with an in-place decoder: write the `n` values of `p` (already checked
        by `_check`) into the flat float32 array `out`."""
        raise NotImplementedError

    def _decode_fresh(self, p: Payload, ctx: CodecContext) -> torch.Tensor:
        """`decode` for codecs that implement `_decode_flat`: a fresh numpy-allocated output
        (numpy asks for huge pages; torch.empty's 4 KiB pages fault several times slower)."""
        n = self._check(p)
        out = np.empty(n, np.float32)
        self._decode_flat(p, n, out, ctx)
        return torch.from_numpy(out).reshape(p.shape).to(getattr(torch, p.dtype))

    def encode_many(self, xs: torch.Tensor, ctxs: "list[CodecContext] | None" = None) -> list[Payload]:
        """Encode `xs[i]` for every i (clients sharing a tensor shape): the same payloads as
        `encode` one by one. Codecs override this to vectorize over the leading axis."""
        ctxs = ctxs or [CodecContext()] * len(xs)
        return [self.encode(x, c) for x, c in zip(xs, ctxs)]

    def encode_batch(self, xs: Mapping[str, torch.Tensor]) -> dict[str, list[Payload]]:
        """`encode_many` for every tensor of a model at once (`xs[name]` holds that tensor for B
        clients): `{name: [payload of client 0, ...]}`, the same payloads as `encode` one by one.
        Codecs override this to encode the whole model in a few passes, which is what decides
        the cost for small models."""
        return {k: self.encode_many(v) for k, v in xs.items()}

    def encode_fold_batch(self, xs: Mapping[str, torch.Tensor], groups: Sequence[Sequence[int]],
                          alphas: Sequence[float]) -> tuple[dict[str, Payload], list[dict[str, torch.Tensor]]]:
        """`encode_batch(xs)`, then for each group of clients (indices into the batch) the float64
        sums `fold_many` adds from their payloads into zeros, weighted by `alphas[i]`: a worker's
        partial sums (`resources.worker_reduce`). Returns ({name: client 0's payload}, [{name:
        sum, shaped like the tensor} per group]). Codecs override it to skip building each
        client's payload; the sums must stay bit-equal to this.

        Raises:
            PayloadError: a payload is malformed or decodes to NaN or infinity.
        """
        per = self.encode_batch(xs)
        sums = []
        for g in groups:
            out = {}
            for k, ps in per.items():
                acc = torch.zeros(ps[0].shape, dtype=torch.float64)
                self.fold_many([ps[i] for i in g], [alphas[i] for i in g], acc.view(-1))
                out[k] = acc
            sums.append(out)
        return {k: ps[0] for k, ps in per.items()}, sums

    def wire_bytes(self, shape: tuple[int, ...]) -> int | None:
        """Exact payload bytes for a tensor of `shape`, or None where it depends on the data."""
        return None

    def config(self) -> dict[str, Any]:
        """The keyword arguments this codec was built with (for logs and job specs)."""
        return {}

    def _payload(self, x: torch.Tensor, params: dict, data) -> Payload:
        return Payload(
            codec=self.name,
            version=self.version,
            dtype=str(x.dtype).removeprefix("torch."),
            shape=tuple(int(s) for s in x.shape),
            params=params,
            data=data,
        )

    def _check(self, p: Payload) -> int:
        """Check codec name, version, dtype and shape; return the element count."""
        if p.codec != self.name:
            raise PayloadError(f"payload of codec {p.codec!r} given to codec {self.name!r}")
        if p.version != self.version:
            raise PayloadError(
                f"{self.name}: wire version {p.version} is not supported (this build speaks {self.version})"
            )
        return check_shape(p)


_C = TypeVar("_C", bound=type)
_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str, version: int = 1) -> Callable[[_C], _C]:
    """Class decorator: register a `Codec` subclass under `name`."""

    def deco(cls: _C) -> _C:
        if name in _REGISTRY:
            raise ValueError(f"codec {name!r} is registered twice")
        cls.name = name
        cls.version = version
        _REGISTRY[name] = cls
        return cls

    return deco


def get_codec(name: str, **params: Any) -> Codec:
    """Build the codec registered as `name` with its keyword parameters.

    Raises:
        UnknownCodecError: no codec of that name; the message lists the known ones.
        ValueError: a parameter is invalid for that codec.
    """
    from . import codecs as _codecs  # noqa: F401  (registers the built-in codecs)

    if name not in _REGISTRY:  # a plug-in's codec: its entry point registers it when imported
        from fedray.plugins import load_group

        load_group("fedray.codecs")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {name!r}; known codecs: {', '.join(sorted(_REGISTRY))}"
        ) from None
    try:
        return factory(**params)
    except TypeError as e:
        raise ValueError(f"codec {name!r}: {e}") from None


def available_codecs() -> list[str]:
    """Names of all registered codecs, sorted."""
    from fedray.plugins import load_group

    from . import codecs as _codecs  # noqa: F401

    load_group("fedray.codecs")
    return sorted(_REGISTRY)


def decode_checked(codec: Codec, p: Payload, ctx: CodecContext = CodecContext(), *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode `p` (into `out` when given, see `Codec.decode_into`) and refuse results that are
    not finite or not of the declared shape.

    Raises:
        PayloadError: the payload is malformed or decodes to NaN or infinity.
        ValueError: `out` is not a contiguous float32 CPU tensor of the payload's size.
    """
    y = codec.decode(p, ctx) if out is None else codec.decode_into(p, out, ctx)
    if tuple(y.shape) != tuple(p.shape):
        raise PayloadError(f"{p.codec}: decoded shape {tuple(y.shape)} != declared {p.shape}")
    # finite_output holds in float32; a narrower declared dtype can overflow in the final cast.
    trusted = codec.finite_output and y.dtype in (torch.float32, torch.float64)
    if y.is_floating_point() and not trusted and not _all_finite(y):
        raise PayloadError(f"{p.codec}: payload decodes to NaN or infinity")
    if out is not None and p.dtype in _NARROW and y.numel() and not bool(torch.isfinite(y.to(_NARROW[p.dtype])).all()):
        # decoded into float32 for a tensor declared float16/bfloat16: it must survive the cast
        raise PayloadError(f"{p.codec}: payload decodes to values beyond {p.dtype}'s range")
    return y


_NARROW = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _out_view(out: torch.Tensor, n: int, codec: str) -> np.ndarray:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu" \
            or not out.is_contiguous() or out.numel() != n:
        raise ValueError(f"{codec}: decode_into needs a contiguous float32 CPU tensor of {n} elements, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} of shape {tuple(getattr(out, 'shape', ()))}")
    return out.detach().view(-1).numpy()


def _all_finite(t: torch.Tensor) -> bool:
    # numpy's isfinite is about 25x faster than torch's on this CPU build (0.17 ms against 4.4 ms
    # for 1M float32 values, one thread); the check runs on every tensor the server decodes.
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        from .codecs._buf import all_finite

        return all_finite(t.detach().reshape(-1).numpy())
    return bool(torch.isfinite(t).all())
