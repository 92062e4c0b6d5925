"""Language models for the OMC and P2U speed benchmarks, built from plain torch.nn layers.

- `CharLSTM`: the Shakespeare next-character model of Caldas et al. / LEAF: an 8-d character
  embedding, a 2-layer LSTM of 256 units, a linear layer over the characters (80 by default),
  predicting from the last time step.
- `DecoderLM`: a GPT-style decoder-only transformer (pre-norm blocks of causal self-attention
  and a 4x MLP, learned positions, untied output layer). Its defaults here give
  about 110M parameters (d=768, 12 layers, 12 heads, 16384 tokens).

Random initialisation only: nothing is downloaded.
"""

from __future__ import annotations

import torch
from lm_task import DecoderLM as _TaskLM, num_params  # the same model the 100M job trains
from torch import nn

__all__ = ["CharLSTM", "DecoderLM", "num_params"]


class CharLSTM(nn.Module):
    def __init__(self, vocab: int = 80, embed: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(idx))
        return self.head(out[:, -1])


class DecoderLM(_TaskLM):
    """benchmarks/lm_task.py's GPT-style model with this benchmark's defaults (a 16k vocabulary,
    12 blocks, 256 positions: about 110M parameters at d=768)."""

    def __init__(self, vocab: int = 16384, d: int = 768, layers: int = 12, heads: int = 12, context: int = 256) -> None:
        super().__init__(vocab=vocab, d=d, layers=layers, heads=heads, context=context)
