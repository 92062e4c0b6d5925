"""Per-client codec memory: one explicit, picklable object the caller keeps between rounds."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

import torch

__all__ = ["CodecState", "CodecStateStore", "ErrorFeedbackState"]


@dataclass
class CodecState:
    """Mutable memory of stateful codecs for one client, keyed by tensor name (`CodecContext.key`).

    Pass the same object as `CodecContext(state=...)` every round for that client. It holds
    plain CPU tensors, so it pickles (and travels through Ray's object store) as is.

    Attributes:
        residuals: error-feedback memory `e = p - C(p)` per tensor (codec `ef`).
        warm_start: PowerSGD's last `Q` factor per tensor (codec `powersgd`).
    """

    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    warm_start: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.residuals.clear()
        self.warm_start.clear()

    def nbytes(self) -> int:
        """Memory held, in bytes (what error feedback costs a client)."""
        ts = list(self.residuals.values()) + list(self.warm_start.values())
        return sum(t.numel() * t.element_size() for t in ts)


# The name the error-feedback literature and the job docs use; it is the same object, so one
# state per client serves `ef(powersgd)` and any other composition.
ErrorFeedbackState = CodecState


class CodecStateStore:
    """The codec states of the clients that have trained, within a byte budget.

    Only a client that trained has a state (nothing is stored for the rest of the population).
    When the states held exceed `max_bytes`, the least recently used are dropped: such a client's
    next round starts from an empty state (no residual), as a client that lost its memory would.
    `evicted` counts the states dropped.

    `setdefault(key, default)` returns the key's state, creating it from `default`; a state grows
    after it is handed out (the codec fills it), so its size is counted at the next call.

    Raises:
        ValueError: max_bytes < 1.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.evicted = 0
        self._states: OrderedDict[Hashable, CodecState] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._total = 0
        self._last: Hashable | None = None

    def setdefault(self, key: Hashable, default: CodecState) -> CodecState:
        self._settle()
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = default
        else:
            self._states.move_to_end(key)
        self._last = key
        return state

    def get(self, key: Hashable, default: CodecState | None = None) -> CodecState | None:
        return self._states.get(key, default)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._states

    def __len__(self) -> int:
        return len(self._states)

    def nbytes(self) -> int:
        """Bytes held by the states, as of the last call (the newest state's growth counts at the next)."""
        return self._total

    def _settle(self) -> None:
        """Count the last state handed out at its current size, then drop the least recently used
        states until the total is within the budget (the newest one always stays)."""
        key, self._last = self._last, None
        if key is not None and key in self._states:
            n = self._states[key].nbytes()
            self._total += n - self._sizes.get(key, 0)
            self._sizes[key] = n
        while self._total > self.max_bytes and len(self._states) > 1:
            old, _ = self._states.popitem(last=False)
            self._total -= self._sizes.pop(old, 0)
            self.evicted += 1
