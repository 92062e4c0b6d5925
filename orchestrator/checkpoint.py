"""Checkpoints after each round: global model, strategy state, metrics so far.

Storage is pluggable through `CheckpointStore`; `LocalDirStore` writes atomically to a folder
(a mounted volume on a cluster). Client sampling, subnets and codec randomness are pure functions
of (job seed, round, client), so no RNG state needs saving; the rest of what a round depends on
(the population model's upload-size estimate, the DP noise secret) is in the checkpoint:
resuming from round r with the same seed replays rounds r+1.. exactly as an uninterrupted run
would. A checkpoint holds tensors and plain containers only and is loaded with
`weights_only=True` (no arbitrary unpickling). It holds the DP noise secret: keep it on the
driver's side.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["CheckpointStore", "LocalDirStore", "open_store"]


class CheckpointStore(Protocol):
    def save(self, round: int, state: dict[str, Any]) -> None: ...

    def load_latest(self) -> dict[str, Any] | None: ...


class LocalDirStore:
    """`round-000012.pt` files in a folder; a write goes to a temporary file, then an atomic rename."""

    _NAME = re.compile(r"^round-(\d{6})\.pt$")

    def __init__(self, path: str | os.PathLike, keep: int = 3) -> None:
        self.path = Path(path)
        self.keep = keep
        self.path.mkdir(parents=True, exist_ok=True)

    def _rounds(self) -> list[int]:
        return sorted(int(m.group(1)) for f in self.path.iterdir() if (m := self._NAME.match(f.name)))

    def save(self, round: int, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp = self.path / f".round-{round:06d}.pt.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / f"round-{round:06d}.pt")
        for old in self._rounds()[: -self.keep]:
            (self.path / f"round-{old:06d}.pt").unlink(missing_ok=True)

    def load_latest(self) -> dict[str, Any] | None:
        rounds = self._rounds()
        if not rounds:
            return None
        return torch.load(self.path / f"round-{rounds[-1]:06d}.pt", weights_only=True)


def open_store(uri: str) -> CheckpointStore:
    """A store for `uri`: a local path (or file://path). Other schemes can be added here.

    Raises:
        ValueError: unsupported scheme.
    """
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"checkpoint store {uri!r}: only local paths (or file://) are supported")
    return LocalDirStore(uri.removeprefix("file://"))
