"""A decoder-only transformer language model as a `fedray.Task`, for the large-model benchmarks.

`DecoderLM` (fedray.workers.transformer) is a GPT-style model from plain torch.nn layers. Random
initialisation (nothing is downloaded). The defaults of `LMTask`
(d=768, 15 layers, 12 heads, 256 tokens, 64 positions) give 106.8M parameters.

Client data: `samples_per_client` random token sequences per client, drawn from a seeded
Markov chain (each token's successor is one of 4 fixed tokens), so that a model can learn it but
nothing needs to be downloaded. Training: `local_epochs` passes of SGD over the client's
sequences in batches of the job's `batch_size`, next-token cross-entropy at every position.

Job spec:  task: {target: "lm_task:LMTask", params: {layers: 2, d: 64}}
"""

from __future__ import annotations

import fedray
import torch
from torch import nn
from torch.nn import functional as F

from fedray.workers.transformer import DecoderLM

__all__ = ["DecoderLM", "LMTask", "num_params"]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _int(name: str, value, lo: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"task.params.{name}: must be an integer >= {lo}, got {value!r}")


class LMTask(fedray.Task):
    """A `DecoderLM` trained on seeded synthetic token sequences, `samples_per_client` of
    `seq_len` tokens (+1 for the targets) per client."""

    def __init__(self, *, vocab: int = 256, d: int = 768, layers: int = 15, heads: int = 12, seq_len: int = 64,
                 num_clients: int = 16, samples_per_client: int = 4, test_samples: int = 0, seed: int = 0):
        for name, value in (("vocab", vocab), ("d", d), ("layers", layers), ("heads", heads), ("seq_len", seq_len),
                            ("num_clients", num_clients), ("samples_per_client", samples_per_client)):
            _int(name, value)
        _int("test_samples", test_samples, 0)
        _int("seed", seed, 0)
        if d % heads:
            raise ValueError(f"task.params.d: {d} is not a multiple of heads={heads}")
        self.vocab, self.d, self.layers, self.heads, self.seq_len = vocab, d, layers, heads, seq_len
        self.clients, self.samples_per_client, self.test_samples, self.seed = (
            num_clients, samples_per_client, test_samples, seed)

    def model(self) -> nn.Module:
        return DecoderLM(self.vocab, self.d, self.layers, self.heads, self.seq_len)

    def num_clients(self) -> int:
        return self.clients

    def _sequences(self, n: int, stream: int) -> torch.utils.data.TensorDataset:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + stream) & 0x7FFFFFFFFFFFFFFF)
        succ = torch.randint(0, self.vocab, (self.vocab, 4), generator=torch.Generator().manual_seed(self.seed))
        seq = torch.empty(n, self.seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, self.vocab, (n,), generator=g)
        pick = torch.randint(0, 4, (n, self.seq_len), generator=g)
        for t in range(self.seq_len):
            seq[:, t + 1] = succ[seq[:, t], pick[:, t]]
        return torch.utils.data.TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())

    def client_data(self, client_id: int) -> torch.utils.data.TensorDataset:
        if not 0 <= client_id < self.clients:
            raise IndexError(f"client_id {client_id} out of range [0, {self.clients})")
        return self._sequences(self.samples_per_client, 1 + client_id)

    def test_data(self):
        return self._sequences(self.test_samples, 0) if self.test_samples else None

    def client_sizes(self):
        return [self.samples_per_client] * self.clients

    def train(self, model: nn.Module, data, ctx) -> dict:
        """`ctx.local_epochs` passes of plain SGD (`ctx.lr`, `ctx.momentum`) over `data`."""
        opt = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=ctx.momentum)
        loader = torch.utils.data.DataLoader(data, batch_size=ctx.batch_size, shuffle=True, generator=ctx.generator())
        model.train()
        loss_sum, steps = 0.0, 0
        for _ in range(ctx.local_epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                loss.backward()
                opt.step()
                loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
        del opt  # no optimizer state outlives the call
        return {"loss": loss_sum / max(steps, 1), "examples": len(data), "steps": steps}

    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        """Next-token accuracy and mean cross-entropy over every position."""
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(data, batch_size=64):
                logits = model(x).flatten(0, 1)
                loss_sum += float(F.cross_entropy(logits, y.flatten(), reduction="sum"))
                correct += int((logits.argmax(1) == y.flatten()).sum())
                n += y.numel()
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}

    def describe(self) -> str:
        return f"LMTask(d={self.d}, layers={self.layers}, heads={self.heads}, seq_len={self.seq_len})"
