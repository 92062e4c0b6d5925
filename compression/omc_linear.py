"""An 8-bit OMC Linear layer's products straight from its codes, in blocks of input columns.

The weight is W = alpha * C + beta with C the uint8 codes (a (rows, cols) view of the stored
buffer). `CodesLinear` computes x @ W.T + b (forward) and g @ W (input gradient) through
column blocks of the model's float32 workspace, so that at most one block of the weight exists
in fp32: the integer codes of a block are copied there (exact in float32), each GEMM carries
alpha, and beta enters once per layer (beta * rowsum(x) added to the output; for the input
gradient, beta * rowsum(g) as the GEMMs' broadcast input). That is one op per block besides
its GEMM (a full decompression alpha * C + beta takes three), on views made once per buffer.
"""

from __future__ import annotations

import torch

__all__ = ["CodesLinear"]


class CodesLinear:
    """The column-block products of one 8-bit Linear weight (see the module docstring);
    `ws` is the model's `omc_kernels.Workspace`."""

    def __init__(self, ws, block_cols: int) -> None:  # noqa: ANN001
        self.ws, self.block_cols = ws, block_cols
        self._plan: tuple | None = None

    def blocks(self, qp) -> list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:  # noqa: ANN001
        """(k0, k1, codes, workspace, workspace.T) per block: the codes as a (rows, k1 - k0)
        uint8 view of the stored buffer, the workspace as a float32 view of that shape. Cached;
        rebuilt when the buffer or the workspace is replaced."""
        ws, plan = self.ws, self._plan
        if plan is None or plan[0] is not qp.buf or plan[1] is not ws.buf:
            rows, cols = qp.shape
            kb = min(self.block_cols, cols)
            wbuf = ws.get(rows * kb)
            codes = torch.from_numpy(qp.buf).view(rows, cols)
            blocks = []
            for k in range(0, cols, kb):
                w = wbuf[: rows * (min(k + kb, cols) - k)].view(rows, -1)
                blocks.append((k, min(k + kb, cols), codes[:, k : k + kb], w, w.t()))
            plan = self._plan = (qp.buf, ws.buf, blocks)
        return plan[2]

    def _split(self, t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """The column blocks of a 2-D tensor (views)."""
        if n == 1:
            return (t,)
        kb = self.block_cols
        return t.view(t.shape[0], n, kb).unbind(1) if t.shape[1] == n * kb and t.is_contiguous() else t.split(kb, 1)

    def forward(self, qp, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        blocks, a = self.blocks(qp), qp.alpha
        y = None
        for xi, (_, _, c, w, wt) in zip(self._split(x2, len(blocks)), blocks):
            w.copy_(c)
            if y is not None:
                y.addmm_(xi, wt, alpha=a)
            elif bias is not None:
                y = torch.addmm(bias, xi, wt, alpha=a)
            else:
                y = torch.mm(xi, wt).mul_(a)
        if qp.beta:
            y.add_(x2.sum(1, keepdim=True), alpha=qp.beta)
        return y if x.dim() == 2 else y.reshape(tuple(x.shape[:-1]) + (qp.shape[0],))

    def input_grad(self, qp, g2: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        """g2 @ W for a 2-D g2."""
        blocks, a, b = self.blocks(qp), qp.alpha, qp.beta
        rs = g2.sum(1, keepdim=True)
        if len(blocks) == 1:
            w = blocks[0][3]
            w.copy_(blocks[0][2])
            return torch.addmm(rs, g2, w, beta=b, alpha=a)
        gx = torch.empty(g2.shape[0], qp.shape[1])
        for out, (_, _, c, w, _) in zip(self._split(gx, len(blocks)), blocks):
            w.copy_(c)
            torch.addmm(rs, g2, w, beta=b, alpha=a, out=out)
        return gx
