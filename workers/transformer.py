"""A decoder-only (GPT-style) transformer from plain torch.nn layers, for tasks that federate a
language model: token and learned position embeddings, pre-norm blocks of causal self-attention
and a 4x GELU MLP, a final LayerNorm and an untied output layer. Every weight matrix is an
`nn.Linear` or `nn.Embedding` (what OMC, `compression.frozen.freeze_base` and peft's LoRA wrap)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DecoderLM"]


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
    """Logits (batch, time, vocab) of the next token at every position; `context` positions."""

    def __init__(self, vocab: int = 256, d: int = 768, layers: int = 15, heads: int = 12, context: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))
