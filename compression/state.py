"""Per-client codec memory: one explicit, picklable object the caller keeps between rounds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CodecState", "ErrorFeedbackState"]


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
