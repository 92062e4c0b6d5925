"""Built-in codecs; importing this package registers them."""

from . import bnb, cast, identity, int8, lowrank, p2u_codec, qsgd, sign, sparse, uniform, wrappers  # noqa: F401

__all__: list[str] = []
