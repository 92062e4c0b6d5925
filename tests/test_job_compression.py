"""Federated Dropout, OMC, P2U and stateful codecs inside real jobs (Ray workers, gRPC shards)."""

from __future__ import annotations

import torch

from fedray.compression import get_codec
from fedray.compression.fd import SubnetSpec
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import (
    CompressionSpec, DataSpec, DropoutSpec, JobSpec, ModelSpec, OMCSpec, ResourceSpec, TrainingSpec,
)
from fedray.workers.models import model_layout


def _spec(rounds: int = 3, **kw) -> JobSpec:
    base = dict(
        name="comp", seed=4,
        data=DataSpec(dataset="digits", num_clients=40),
        model=ModelSpec(hidden=(64,)),
        training=TrainingSpec(rounds=rounds, clients_per_round=10, local_epochs=3, batch_size=16, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=5, shards=2),
    )
    base.update(kw)
    return JobSpec(**base)


def _run(spec):
    return run_job(spec, progress=False, log=lambda s: None)


def test_federated_dropout_trains_smaller_models(ray_session):
    full = _run(_spec())
    fd = _run(_spec(dropout=DropoutSpec(keep_rates=(0.5,), policy="random")))
    assert fd.final_accuracy > 0.5, fd.final_accuracy
    r_full, r_fd = full.rounds[-1], fd.rounds[-1]
    assert r_fd.keep_rate == 0.5
    assert r_fd.client_flops < 0.6 * r_full.client_flops  # the sub-model is really smaller
    assert r_fd.bytes_up < 0.6 * r_full.bytes_up
    # Each client downloads only its sub-model (64-32-10 of 64-64-10), encoded by the broadcast
    # codec (identity here): 10 clients x the sub-model's payload bytes, well below the full model.
    layout = model_layout("mlp", (64,), 10, (64,))
    identity = get_codec("identity")
    sub = layout.sub_shapes(SubnetSpec(seed=0, keep_rate=0.5))
    per_client = sum(identity.encode(torch.zeros(s)).nbytes for s in sub.values())
    assert sub["1.weight"] == (32, 64) and sub["3.weight"] == (10, 32)
    for rec, full_rec in zip(fd.rounds, full.rounds):
        assert rec.bytes_down == 10 * per_client, (rec.round, rec.bytes_down, per_client)
        assert rec.bytes_down < 0.55 * full_rec.bytes_down


def test_omc_holds_less_parameter_memory(ray_session):
    # 84k parameters: large against OMC's transient block (16 KiB decompressed at a time)
    omc = _run(_spec(omc=OMCSpec(bits=8), model=ModelSpec(hidden=(256, 256))))
    full = _run(_spec(model=ModelSpec(hidden=(256, 256))))
    assert omc.final_accuracy > 0.5, omc.final_accuracy
    assert omc.rounds[-1].param_memory_bytes < 0.5 * full.rounds[-1].param_memory_bytes
    assert omc.rounds[-1].bytes_down < 0.4 * full.rounds[-1].bytes_down  # the stored form goes down


def test_p2u_clients_train_after_the_first_stage(ray_session):
    spec = _spec(compression=CompressionSpec(codec="int8", broadcast="p2u",
                                             broadcast_params={"stage_bits": [4, 4], "start_after": 0}))
    res = _run(spec)
    rec = res.rounds[-1]
    curve = rec.p2u_stages
    assert [c["stage"] for c in curve] == [0, 1]
    assert rec.bytes_down == curve[0]["cumulative_bytes"] * 10  # 10 clients, each took stage 0 only
    assert curve[1]["cumulative_bytes"] < 0.3 * rec.bytes_down_fp32 / 10
    assert res.final_accuracy > 0.5


def test_error_feedback_codec_keeps_state_per_client(ray_session):
    spec = _spec(compression=CompressionSpec(codec="ef", codec_params={"inner": "topk", "inner_params": {"ratio": 0.1}}))
    res = _run(spec)
    assert res.final_accuracy > 0.3
    assert res.rounds[-1].bytes_up < 0.25 * res.rounds[-1].bytes_up_fp32


def test_pruning_sends_sparse_models_and_clients_keep_the_mask(ray_session):
    from fedray.orchestrator.spec import PruningSpec

    full = _run(_spec(rounds=3))
    pruned = _run(_spec(pruning=PruningSpec(target=0.8, start_round=1, end_round=3)))
    assert [round(r.sparsity, 3) for r in pruned.rounds][-1] == 0.8
    assert pruned.rounds[-1].bytes_down < 0.6 * full.rounds[-1].bytes_down  # sparse payloads go down
    w = pruned.params["1.weight"]
    # the final model is the round-3 pruned model plus client updates that kept pruned weights at 0
    assert float((w == 0).float().mean()) > 0.75
    assert pruned.final_accuracy > 0.4
