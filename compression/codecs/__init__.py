"""Built-in codecs; importing this package registers them."""

from . import identity, int8  # noqa: F401

__all__: list[str] = []
