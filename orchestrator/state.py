"""The job's life cycle: an enum with behaviour, and the legal transitions between its states."""

from __future__ import annotations

import enum

__all__ = ["IllegalTransitionError", "JobError", "JobState", "JobStateMachine"]


class JobError(RuntimeError):
    """The job could not go on; the message says which round and why."""


class IllegalTransitionError(RuntimeError):
    """A job was asked to move between states that have no legal transition."""


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


_LEGAL = {
    JobState.PENDING: {JobState.RUNNING, JobState.FAILED, JobState.STOPPED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED},
}


class JobStateMachine:
    """Holds the current state; `to()` moves it and raises on an illegal transition."""

    def __init__(self) -> None:
        self.state = JobState.PENDING
        self.reason = ""

    def to(self, new: JobState, reason: str = "") -> None:
        """Move to `new`.

        Raises:
            IllegalTransitionError: no legal transition from the current state to `new`.
        """
        if new not in _LEGAL.get(self.state, set()):
            raise IllegalTransitionError(f"job cannot go from {self.state.value} to {new.value}")
        self.state, self.reason = new, reason
