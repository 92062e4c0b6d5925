"""Next-character prediction on Shakespeare's plays, one client per speaking role (LEAF).

The model is Caldas et al.'s / LEAF's: an 8-d character embedding, a 2-layer LSTM of 256 units
and a linear layer to logits over the character vocabulary, predicting the character that
follows `seq_len` (80) characters. Data: see shakespeare_data.py (run `bash scripts/setup.sh`
once to fetch the play texts).

Job spec:  task: {target: "shakespeare_task:ShakespeareTask", params: {max_clients: 100}}
"""

from __future__ import annotations

import os

import fedray
import torch
from torch import nn

import shakespeare_data
from shakespeare_data import VOCAB, CharWindows, Role, load_roles

__all__ = ["CharLSTM", "ShakespeareTask"]


def _ship_data_module() -> None:
    """fedray pickles the task's module by value for Ray workers that do not have this folder on
    their import path; the data module beside it has to travel the same way."""
    try:
        from ray import cloudpickle
    except ImportError:  # no Ray in this process: nothing is pickled for workers
        return
    cloudpickle.register_pickle_by_value(shakespeare_data)


_ship_data_module()


class CharLSTM(nn.Module):
    """Embedding -> one single-layer LSTM per entry of `hidden` -> linear logits of the
    character after the sequence. (One LSTM module per layer, not `nn.LSTM(num_layers=2)`:
    the same computation, but each layer's width can differ, as a Federated Dropout
    sub-model needs.)"""

    def __init__(self, vocab_size: int = len(VOCAB), *, embed_dim: int = 8,
                 hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        widths = (embed_dim, *hidden)
        self.lstms = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for lstm in self.lstms:
            h, _ = lstm(h)
        return self.head(h[:, -1])


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"task.params.{name}: must be an integer >= 1, got {value!r}")


class ShakespeareTask(fedray.Task):
    """LEAF's Shakespeare: each role with >= `min_lines` speeches is one client.

    `max_clients` keeps the roles with the most speeches (ties by play, then speaker), numbered
    by (play, speaker); `max_samples_per_client` and `max_test_samples` cap the windows per
    client and in the central test set, evenly spaced. `plays` restricts to those file stems.
    `hidden`, `embed_dim` and `num_layers` size the model (LEAF: 256, 8, 2). The central test
    set is every selected role's held-out speeches.
    """

    def __init__(self, *, data_dir: str | os.PathLike | None = None, min_lines: int = 10,
                 seq_len: int = 80, max_clients: int | None = None,
                 max_samples_per_client: int | None = None, max_test_samples: int | None = None,
                 test_fraction: float = 0.2, plays: list[str] | None = None, hidden: int = 256,
                 embed_dim: int = 8, num_layers: int = 2):
        for name, value in (("min_lines", min_lines), ("seq_len", seq_len), ("hidden", hidden),
                            ("embed_dim", embed_dim), ("num_layers", num_layers)):
            _positive(name, value)
        for name, value in (("max_clients", max_clients),
                            ("max_samples_per_client", max_samples_per_client),
                            ("max_test_samples", max_test_samples)):
            _positive(name, value, allow_none=True)
        if min_lines < 2:
            raise ValueError(f"task.params.min_lines: must be >= 2, got {min_lines}")
        if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"task.params.test_fraction: must be in (0, 1), got {test_fraction!r}")
        self.data_dir = data_dir
        self.min_lines = min_lines
        self.seq_len = seq_len
        self.max_clients = max_clients
        self.max_samples_per_client = max_samples_per_client
        self.max_test_samples = max_test_samples
        self.test_fraction = float(test_fraction)
        self.plays = list(plays) if plays is not None else None
        self.hidden = hidden
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self._roles: list[Role] | None = None

    @property
    def roles(self) -> list[Role]:
        """The clients' roles, client id = index (parsed once, then kept: a pickled task
        carries them to worker processes)."""
        if self._roles is None:
            self._roles = self._select_roles()
        return self._roles

    def _select_roles(self) -> list[Role]:
        roles = load_roles(self.data_dir, min_lines=self.min_lines,
                           test_fraction=self.test_fraction, seq_len=self.seq_len,
                           plays=self.plays)
        if self.max_clients is not None and len(roles) > self.max_clients:
            ranked = sorted(roles, key=lambda r: (-(r.train_lines + r.test_lines), r.play, r.speaker))
            keep = {(r.play, r.speaker) for r in ranked[: self.max_clients]}
            roles = [r for r in roles if (r.play, r.speaker) in keep]
        if not roles:
            raise ValueError(
                f"task.params: no role has >= {self.min_lines} speeches and more than "
                f"{self.seq_len} training characters; lower min_lines or seq_len"
            )
        return roles

    def model(self) -> nn.Module:
        # fedray calls this under a torch seed derived from the job's seed
        return CharLSTM(len(VOCAB), embed_dim=self.embed_dim,
                        hidden=(self.hidden,) * self.num_layers)

    def fd_model(self, hidden: tuple[int, ...]) -> nn.Module:
        """The LSTM with layer widths `hidden` (a Federated Dropout sub-model)."""
        return CharLSTM(len(VOCAB), embed_dim=self.embed_dim, hidden=tuple(hidden))

    def fd_layout(self):
        """Federated Dropout drops LSTM hidden units (Caldas et al.): group `h{i}` is layer i's
        units, which index the rows of each of its 4 gate blocks (i, f, g, o), the columns of
        its recurrent weights and of the next layer's input weights (or the head's)."""
        from fedray.compression.fd import Axis, ModelLayout

        hidden = (self.hidden,) * self.num_layers
        shapes = tuple((k, tuple(v.shape)) for k, v in self.fd_model(hidden).state_dict().items())
        axes: dict[str, tuple] = {"embed.weight": ()}
        positions: dict[str, int] = {}
        prev = None
        for i in range(self.num_layers):
            g, gates = Axis(f"h{i}"), Axis(f"h{i}", tile=4)
            p = f"lstms.{i}."
            axes[p + "weight_ih_l0"], axes[p + "weight_hh_l0"] = (gates, prev), (gates, g)
            axes[p + "bias_ih_l0"] = axes[p + "bias_hh_l0"] = (gates,)
            positions[p + "weight_ih_l0"] = positions[p + "weight_hh_l0"] = self.seq_len
            prev = g
        axes["head.weight"], axes["head.bias"] = (None, prev), (None,)
        positions["head.weight"] = 1
        return ModelLayout("shakespeare-lstm", (self.seq_len,), len(VOCAB),
                           tuple((f"h{i}", h) for i, h in enumerate(hidden)),
                           tuple((k, tuple(axes[k])) for k, _ in shapes), shapes,
                           tuple(positions.items()))

    def num_clients(self) -> int:
        return len(self.roles)

    def client_data(self, client_id: int) -> CharWindows:
        if not 0 <= client_id < len(self.roles):
            raise IndexError(f"client_id {client_id} out of range [0, {len(self.roles)})")
        return CharWindows(self.roles[client_id].train, self.seq_len,
                           max_samples=self.max_samples_per_client)

    def test_data(self) -> CharWindows:
        per_role = None
        if self.max_test_samples is not None:
            per_role = max(1, self.max_test_samples // len(self.roles))
        return CharWindows.concat(
            [CharWindows.held_out(r, self.seq_len, max_samples=per_role) for r in self.roles])

    def evaluate(self, model: nn.Module, data: CharWindows) -> dict[str, float]:
        """Next-character accuracy and mean cross-entropy, and the accuracy of always
        predicting the data's most frequent character (`majority_rate`)."""
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(data, batch_size=512)
        correct, loss_sum, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in loader:
                logits = model(x)
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                n += int(y.numel())
        model.train(was_training)
        labels = data.labels() if isinstance(data, CharWindows) else torch.tensor(
            [int(data[i][1]) for i in range(len(data))])
        majority = float(torch.bincount(labels).max()) / max(1, labels.numel())
        return {"accuracy": correct / max(1, n), "loss": loss_sum / max(1, n),
                "majority_rate": majority}
