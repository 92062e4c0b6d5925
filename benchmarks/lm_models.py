"""Language models for the OMC and P2U speed benchmarks, built from plain torch.nn layers.

- `CharLSTM`: the Shakespeare next-character model of Caldas et al. / LEAF: an 8-d character
  embedding, a 2-layer LSTM of 256 units, a linear layer over the characters (80 by default),
  predicting from the last time step.
- `DecoderLM`: a GPT-style decoder-only transformer (pre-norm blocks of causal self-attention
  and a 4x MLP, learned positions, untied output layer). `DecoderLM.sized(...)` defaults give
  about 110M parameters (d=768, 12 layers, 12 heads, 16384 tokens).

Random initialisation only: nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        a = F.scaled_dot_product_attention(*(z.reshape(shape).transpose(1, 2) for z in (q, k, v)), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class DecoderLM(nn.Module):
    def __init__(self, vocab: int = 16384, d: int = 768, layers: int = 12, heads: int = 12, context: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
