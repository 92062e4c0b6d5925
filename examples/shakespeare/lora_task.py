"""Adapter-only federated fine-tuning on Shakespeare: LoRA adapters (peft) on a small character
transformer whose pretrained base stays on each client, OMC-compressed (the QLoRA shape).

The base is trained centrally elsewhere (benchmarks/lora_finetune.py trains one on some plays)
and saved with `torch.save(model.state_dict(), PATH)`; clients are the roles of other plays.
With `lora` set, `model()` loads the base, injects peft LoRA adapters into the attention and MLP
projections and freezes everything else with `fedray.compression.frozen.freeze_base`: the frozen
Linear and Embedding weights are held as OMC codes (`base_bits`), the rest as local buffers. The
model's state_dict is then the adapters alone, so that is all fedray broadcasts, uploads and
aggregates. With `lora: null` the same task federates the whole model (full fine-tuning).

Why a transformer rather than LEAF's LSTM: peft's LoRA wraps Linear (and Embedding) layers. In
the transformer every weight matrix is a Linear, so adapters reach every layer; in the LSTM they
could reach only the head and the embedding, as the gate matrices are raw LSTM parameters.

Job spec:  task: {target: "lora_task:ShakespeareLoRATask",
                  params: {base: runs/base.pt, plays: [...], lora: {r: 4, alpha: 8}}}
Needs `pip install 'fedray[lora]'` (peft).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import fedray
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedray.workers.transformer import DecoderLM

import shakespeare_data
from shakespeare_data import VOCAB, Role, load_roles

__all__ = ["CharTransformer", "ShakespeareLoRATask", "TextChunks"]

LORA_TARGETS = ("qkv", "proj", "fc", "out")


def _ship_data_module() -> None:
    """Ray workers without this folder on their path get the data module by value."""
    try:
        from ray import cloudpickle
    except ImportError:
        return
    cloudpickle.register_pickle_by_value(shakespeare_data)


_ship_data_module()


class CharTransformer(DecoderLM):
    """A GPT-style character model (`fedray.workers.transformer.DecoderLM`): logits (batch, time,
    vocab) of the next character at every position, with this task's defaults."""

    def __init__(self, vocab: int = len(VOCAB), *, d: int = 96, layers: int = 2, heads: int = 4,
                 context: int = 80) -> None:
        super().__init__(vocab, d, layers, heads, context)


class TextChunks(torch.utils.data.Dataset):
    """Non-overlapping chunks of `seq_len + 1` characters of `ids`: (chunk[:-1], chunk[1:]).
    `max_chunks` keeps that many, evenly spaced (deterministic)."""

    def __init__(self, ids: np.ndarray, seq_len: int, *, max_chunks: int | None = None) -> None:
        n = (len(ids) - 1) // seq_len
        starts = np.arange(n, dtype=np.int64) * seq_len
        if max_chunks is not None and n > max_chunks:
            starts = starts[np.linspace(0, n - 1, max_chunks).round().astype(np.int64)]
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        self.starts, self.seq_len = torch.from_numpy(starts), seq_len

    def __len__(self) -> int:
        return int(self.starts.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        w = self.ids[s : s + self.seq_len + 1]
        return w[:-1], w[1:]


def chunks_of(roles: list[Role], seq_len: int, *, split: str, max_chunks: int | None = None) -> torch.utils.data.ConcatDataset:
    """Every role's `split` ("train" or "test") text as `TextChunks`, `max_chunks` in all."""
    per = None if max_chunks is None else max(1, max_chunks // max(1, len(roles)))
    parts = [TextChunks(getattr(r, split), seq_len, max_chunks=per) for r in roles if len(getattr(r, split)) > seq_len]
    return torch.utils.data.ConcatDataset(parts)


def train_chars(model: nn.Module, data, *, lr: float, batch_size: int, epochs: int,
                generator: torch.Generator, max_steps: int | None = None) -> dict:
    """Adam on next-character cross-entropy at every position, over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    model.train()
    loss_sum, steps = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
            if max_steps is not None and steps >= max_steps:
                return {"loss": loss_sum / steps, "steps": steps}
    return {"loss": loss_sum / max(steps, 1), "steps": steps}


def evaluate_chars(model: nn.Module, data) -> dict[str, float]:
    """Next-character accuracy and mean cross-entropy over every position of `data`."""
    was = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data, batch_size=256):
            logits = model(x).flatten(0, 1)
            loss_sum += float(F.cross_entropy(logits, y.flatten(), reduction="sum"))
            correct += int((logits.argmax(1) == y.flatten()).sum())
            n += y.numel()
    model.train(was)
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}


def _int(name: str, value, lo: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"task.params.{name}: must be an integer >= {lo}, got {value!r}")


class ShakespeareLoRATask(fedray.Task):
    """Fine-tune a pretrained `CharTransformer` on the roles of `plays`, one client per role.

    `base`: a path to the base's `state_dict` (torch.save) or that mapping; None builds the base
    from `base_seed` (the same in every process). `lora`: {"r", "alpha", "targets"} (defaults 4,
    8, all four projections of every block) or None for full fine-tuning. `base_bits`: OMC bits
    of the frozen Linear and Embedding weights (None: fp32). Training: `local_epochs` of Adam
    at the job's `lr` and `batch_size` over the client's chunks.
    """

    def __init__(self, *, plays: list[str] | None = None, data_dir: str | os.PathLike | None = None,
                 base: str | os.PathLike | Mapping[str, torch.Tensor] | None = None, base_seed: int = 0,
                 lora: Mapping[str, Any] | None = None, base_bits: int | None = 8,
                 d: int = 96, layers: int = 2, heads: int = 4, seq_len: int = 80, min_lines: int = 10,
                 max_clients: int | None = None, max_chunks_per_client: int | None = None,
                 max_test_chunks: int | None = None, test_fraction: float = 0.2) -> None:
        for name, value in (("d", d), ("layers", layers), ("heads", heads), ("seq_len", seq_len)):
            _int(name, value)
        _int("min_lines", min_lines, 2)
        _int("base_seed", base_seed, 0)
        for name, value in (("max_clients", max_clients), ("max_chunks_per_client", max_chunks_per_client),
                            ("max_test_chunks", max_test_chunks)):
            _int(name, value, allow_none=True)
        if d % heads:
            raise ValueError(f"task.params.d: {d} is not a multiple of heads={heads}")
        if base_bits is not None and (not isinstance(base_bits, int) or isinstance(base_bits, bool)
                                      or not 2 <= base_bits <= 16):
            raise ValueError(f"task.params.base_bits: must be an integer in 2..16 or null, got {base_bits!r}")
        self.lora = _lora_params(lora)
        if base is not None and not isinstance(base, Mapping):
            base = os.path.abspath(base)  # resolved where the task is made, before it travels to workers
            if not os.path.isfile(base):
                raise ValueError(f"task.params.base: no file {base}; make one with benchmarks/lora_finetune.py "
                                 f"--save-base PATH, or pass null for a base built from base_seed")
        self.plays, self.data_dir, self.base, self.base_seed = plays, data_dir, base, base_seed
        self.base_bits, self.d, self.layers, self.heads, self.seq_len = base_bits, d, layers, heads, seq_len
        self.min_lines, self.max_clients, self.test_fraction = min_lines, max_clients, float(test_fraction)
        self.max_chunks_per_client, self.max_test_chunks = max_chunks_per_client, max_test_chunks
        self._roles: list[Role] | None = None

    # -- the model ------------------------------------------------------------------------------

    def base_model(self) -> CharTransformer:
        """The plain transformer with the base weights (all trainable, nothing frozen)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.base_seed)
            m = CharTransformer(len(VOCAB), d=self.d, layers=self.layers, heads=self.heads, context=self.seq_len)
        if self.base is not None:
            state = self.base if isinstance(self.base, Mapping) else torch.load(self.base, weights_only=True)
            try:
                m.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"task.params.base: does not fit CharTransformer(d={self.d}, layers={self.layers}, "
                                 f"seq_len={self.seq_len}): {str(e).splitlines()[0]}") from None
        return m

    def model(self) -> nn.Module:
        m = self.base_model()
        if self.lora is None:
            return m
        from peft import LoraConfig, inject_adapter_in_model

        from fedray.compression.frozen import freeze_base
        from fedray.config import OMCConfig

        cfg = LoraConfig(r=self.lora["r"], lora_alpha=self.lora["alpha"], target_modules=list(self.lora["targets"]),
                         lora_dropout=0.0, bias="none")
        m = inject_adapter_in_model(cfg, m)  # lora_A random (fedray seeds this call), lora_B zero
        freeze_base(m, omc=OMCConfig(bits=self.base_bits) if self.base_bits else None)
        return m

    # -- data -----------------------------------------------------------------------------------

    @property
    def roles(self) -> list[Role]:
        if self._roles is None:
            roles = load_roles(self.data_dir, min_lines=self.min_lines, test_fraction=self.test_fraction,
                               seq_len=self.seq_len, plays=self.plays)
            if self.max_clients is not None and len(roles) > self.max_clients:
                ranked = sorted(roles, key=lambda r: (-(r.train_lines + r.test_lines), r.play, r.speaker))
                keep = {(r.play, r.speaker) for r in ranked[: self.max_clients]}
                roles = [r for r in roles if (r.play, r.speaker) in keep]
            if not roles:
                raise ValueError(f"task.params: no role of plays={self.plays} has >= {self.min_lines} speeches")
            self._roles = roles
        return self._roles

    def num_clients(self) -> int:
        return len(self.roles)

    def client_data(self, client_id: int) -> TextChunks:
        if not 0 <= client_id < len(self.roles):
            raise IndexError(f"client_id {client_id} out of range [0, {len(self.roles)})")
        return TextChunks(self.roles[client_id].train, self.seq_len, max_chunks=self.max_chunks_per_client)

    def test_data(self):
        return chunks_of(self.roles, self.seq_len, split="test", max_chunks=self.max_test_chunks)

    def client_sizes(self):
        return [(len(r.train) - 1) // self.seq_len if self.max_chunks_per_client is None
                else min(self.max_chunks_per_client, (len(r.train) - 1) // self.seq_len) for r in self.roles]

    # -- training -------------------------------------------------------------------------------

    def train(self, model: nn.Module, data, ctx) -> dict:
        out = train_chars(model, data, lr=ctx.lr, batch_size=ctx.batch_size, epochs=ctx.local_epochs,
                          generator=ctx.generator())
        return {**out, "examples": len(data)}

    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        return evaluate_chars(model, data)

    def describe(self) -> str:
        how = "full" if self.lora is None else f"LoRA r={self.lora['r']}, base {self.base_bits or 32}-bit"
        return f"ShakespeareLoRATask(d={self.d}, layers={self.layers}, {how})"


def _lora_params(lora: Mapping[str, Any] | None) -> dict | None:
    if lora is None:
        return None
    if not isinstance(lora, Mapping):
        raise ValueError(f"task.params.lora: must be a mapping like {{r: 4, alpha: 8}} or null, got {lora!r}")
    unknown = sorted(set(lora) - {"r", "alpha", "targets"})
    if unknown:
        raise ValueError(f"task.params.lora: unknown keys {unknown}; allowed: r, alpha, targets")
    out = {"r": lora.get("r", 4), "alpha": lora.get("alpha", 8), "targets": tuple(lora.get("targets", LORA_TARGETS))}
    _int("lora.r", out["r"])
    if not isinstance(out["alpha"], (int, float)) or isinstance(out["alpha"], bool) or not math.isfinite(out["alpha"]) \
            or out["alpha"] <= 0:
        raise ValueError(f"task.params.lora.alpha: must be a positive number, got {out['alpha']!r}")
    bad = [t for t in out["targets"] if t not in LORA_TARGETS]
    if bad or not out["targets"]:
        raise ValueError(f"task.params.lora.targets: {bad or 'empty'}; choose among {list(LORA_TARGETS)}")
    return out
