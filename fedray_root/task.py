"""The unit a user brings: `fedray.Task`, a model, per-client data, test data, and (optionally)
how a client trains and how a model is evaluated.

    class MyTask(fedray.Task):
        def model(self) -> torch.nn.Module: ...
        def num_clients(self) -> int: ...
        def client_data(self, client_id: int) -> torch.utils.data.Dataset: ...
        def test_data(self) -> torch.utils.data.Dataset | None: ...
        def train(self, model, data, ctx) -> dict: ...                 # optional
        def evaluate(self, model, data) -> dict[str, float]: ...       # optional

The same task object (or `task: {target: "mod:MyTask", params: {...}}` in a job spec) drives
simulated clients in Ray worker actors, real clients (`fedray client --task`) and the driver's
central evaluation. The defaults train and evaluate a classifier: minibatch SGD with the job's
epochs, batch size, learning rate and momentum on cross-entropy; accuracy and mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # torch is imported where a task is used, not where a job spec is parsed
    import torch
    from torch import nn

__all__ = ["Task", "TrainContext"]


@dataclass(frozen=True)
class TrainContext:
    """What one client's local training may use besides its model and data.

    Attributes:
        round: the round number (1-based).
        client_id: the client's id.
        seed: this client's seed for this round (derived from the job seed, round and id; the
            same whichever worker or process trains it). Draw every random choice from it.
        local_epochs, batch_size, lr, momentum: the job's `training` section.
        device: where the model lives.
        prox_mu: FedProx's proximal weight (0: off).
        mask: pruning keep-masks by parameter name (None: no pruning); weights outside the mask
            must stay zero.
        extra: anything else the job passes (reserved; empty today).
    """

    round: int
    client_id: int
    seed: int
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    device: Any = "cpu"  # a torch.device or its name
    prox_mu: float = 0.0
    mask: Mapping[str, torch.Tensor] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with this client's seed (batch order, augmentation, ...)."""
        import torch

        return torch.Generator().manual_seed(self.seed & 0x7FFFFFFFFFFFFFFF)


class Task:
    """Subclass this and implement `model`, `num_clients`, `client_data` (and `test_data` for
    central evaluation). Constructor keyword arguments are the spec's `task.params`.

    A task must be cheap to construct and picklable: fedray builds it in the driver and ships
    it to worker actors, which call `client_data` for the clients they train. Load data lazily
    (in `client_data` / `test_data`), not in `__init__`, when it is large.
    """

    def model(self) -> nn.Module:
        """The global model. Called under a torch seed derived from the job seed, so its initial
        weights are reproducible; worker processes call it too (their weights are overwritten)."""
        raise NotImplementedError(f"{type(self).__name__}.model() is not implemented")

    def num_clients(self) -> int:
        """How many clients the population has (ids 0 .. num_clients-1)."""
        raise NotImplementedError(f"{type(self).__name__}.num_clients() is not implemented")

    def client_data(self, client_id: int) -> torch.utils.data.Dataset:
        """Client `client_id`'s local training examples: a map-style torch Dataset whose items
        are (input, target) pairs."""
        raise NotImplementedError(f"{type(self).__name__}.client_data() is not implemented")

    def test_data(self) -> torch.utils.data.Dataset | None:
        """Held-out examples for the driver's evaluation after each round; None: no central
        evaluation (the round's metrics are then the clients' own)."""
        return None

    def train(self, model: nn.Module, data: torch.utils.data.Dataset, ctx: TrainContext) -> dict:
        """Train `model` in place on `data`; return at least `{"loss": float, "examples": int}`.

        Default: `ctx.local_epochs` epochs of minibatch SGD (lr, momentum, batch size from the
        job) on cross-entropy, batch order from `ctx.seed`. Overriding this turns batched
        multi-client training off (clients then train one by one).
        """
        from fedray.workers.train import train_dataset

        return train_dataset(model, data, ctx)

    def evaluate(self, model: nn.Module, data: torch.utils.data.Dataset) -> dict[str, float]:
        """Metrics of `model` on `data`. Default: {"accuracy", "loss"} (cross-entropy)."""
        from fedray.workers.train import evaluate_dataset

        return evaluate_dataset(model, data)

    # -- optional: Federated Dropout ---------------------------------------------------------

    def fd_layout(self):
        """The model's Federated Dropout layout (`fedray.compression.fd.ModelLayout`), or None
        when its units cannot be dropped (a job with `dropout:` is then refused)."""
        return None

    def fd_model(self, hidden: tuple[int, ...]) -> nn.Module:
        """The model with hidden widths `hidden` (a Federated Dropout sub-model)."""
        raise NotImplementedError(f"{type(self).__name__} does not build Federated Dropout sub-models")

    def client_sizes(self):
        """Examples per client (a sequence of num_clients ints): what the population model
        (`population:`) prices compute time by. Default: `len(client_data(i))` for every client."""
        return [len(self.client_data(i)) for i in range(self.num_clients())]

    def describe(self) -> str:
        """One line for logs."""
        return type(self).__name__


def overrides(task: Task, method: str) -> bool:
    """Whether `task`'s class replaces `Task.<method>`'s default."""
    return getattr(type(task), method) is not getattr(Task, method)
