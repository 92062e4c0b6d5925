"""Exact resume with a population model and DP noise, and DP noise that participants cannot
regenerate (real Ray, real gRPC shards, real training)."""

from __future__ import annotations

import json

import numpy as np
import torch

from fedray.orchestrator.checkpoint import LocalDirStore
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.privacy import add_gaussian_noise, noise_generator
from fedray.orchestrator.spec import (
    CompressionSpec, DataSpec, DPSpec, JobSpec, PopulationSpec, ResourceSpec, TrainingSpec,
)


def _spec(ck=None, rounds=3, z=1.0, population=True) -> JobSpec:
    return JobSpec(
        name="dp-resume", seed=13,
        data=DataSpec(dataset="digits", num_clients=30),
        training=TrainingSpec(rounds=rounds, clients_per_round=5, local_epochs=1, batch_size=16, lr=0.1),
        compression=CompressionSpec(codec="int8"),  # uploads a quarter of fp32: the estimate matters
        resources=ResourceSpec(num_workers=2, clients_per_call=3),
        privacy=DPSpec(noise_multiplier=z, clip_norm=1.0, noise_secret_env="FEDRAY_TEST_UNSET_NOISE_SECRET"),
        # upload and compute times comparable: the upload-size estimate decides who finishes first
        population=PopulationSpec(over_select=1.6, up_mbps_median=1.0, up_sigma=1.5, seconds_per_example=1e-2)
        if population else None,
        checkpoint_dir=None if ck is None else str(ck),
    )


def test_resume_with_population_and_dp_noise_is_bit_identical(ray_session, tmp_path):
    ck = tmp_path / "ck"
    full = run_job(_spec(ck), progress=False, log=lambda s: None)
    store = LocalDirStore(ck)
    assert store.load_latest()["round"] == 3
    for r in (2, 3):  # as if the driver died after round 1
        (ck / f"round-{r:06d}.pt").unlink()
    resumed = run_job(_spec(ck), progress=False, log=lambda s: None, resume=True)
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    for k, v in full.params.items():
        assert torch.equal(resumed.params[k], v), k
    # the same clients were kept in rounds 2 and 3 (the stragglers model priced them the same)
    assert [(r.bytes_up, r.virtual_s) for r in resumed.rounds] == [(r.bytes_up, r.virtual_s) for r in full.rounds]


def test_what_a_client_is_told_does_not_reproduce_the_noise(ray_session, tmp_path):
    ck = tmp_path / "ck"
    noisy = run_job(_spec(ck, rounds=1, population=False), progress=False, log=lambda s: None)
    clean = run_job(_spec(rounds=1, z=0.0, population=False), progress=False, log=lambda s: None)
    noise = {k: (noisy.params[k].double() - clean.params[k].double()) for k in noisy.params}
    flat = torch.cat([noise[k].flatten() for k in sorted(noise)])
    std = 1.0 * 1.0 / 5
    assert abs(float(flat.std()) / std - 1) < 0.05  # it is the noise (same clipped mean in both runs)

    def predicted(gen) -> torch.Tensor:
        zeros = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in noise.items()}
        out = add_gaussian_noise(zeros, noise_multiplier=1.0, clip_norm=1.0, num_clients=5, generator=gen)
        return torch.cat([out[k].flatten() for k in sorted(out)])

    def corr(a, b) -> float:
        return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])

    # Everything a real client learns: GetJob's spec_json (seed, model, training, compression,
    # data), the job id, its token, the round; summary.json adds the whole spec. Generators
    # seeded from any of them (the old scheme was SeedSequence([seed, round, 0xD9])):
    told = noisy.summary()
    seed, job_id = told["spec"]["seed"], told["job_id"]
    guesses = []
    for s in (seed, hash(job_id) & (2**63 - 1), int.from_bytes(job_id.encode()[:8].ljust(8, b"\0"), "big") >> 1):
        for extra in ((), (1,), (1, 0xD9)):
            ss = np.random.SeedSequence([s, *extra])
            guesses.append(torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)))
        guesses.append(torch.Generator().manual_seed(s))
    for g in guesses:
        assert abs(corr(predicted(g), flat)) < 0.05
    # The driver's secret (in its checkpoint, not in anything sent) does reproduce it.
    secret = bytes.fromhex(LocalDirStore(ck).load_latest()["noise_secret"])
    assert corr(predicted(noise_generator(secret, 1)), flat) > 0.999
    assert secret.hex() not in json.dumps(told)
