"""Built-in codecs; importing this package registers them."""

from . import bnb, cast, identity, int8, lowrank, p2u_codec, qsgd, sign, sparse, uniform, wrappers  # noqa: F401
from .. import omc  # noqa: F401,E402  (registers "omc", OMC's stored form)

__all__: list[str] = []
