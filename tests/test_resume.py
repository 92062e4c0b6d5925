"""`fedray run --resume` after the driver is SIGKILLed ends with the same final model as an
uninterrupted run with the same seed (bit-identical: sampling, training and codec randomness are
functions of (seed, round, client), and shard sums are float64)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from fedray.orchestrator.checkpoint import LocalDirStore
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import DataSpec, JobSpec, ResourceSpec, TrainingSpec


ROUNDS = 60


def _spec() -> JobSpec:
    return JobSpec(
        name="resume", seed=21,
        data=DataSpec(dataset="digits", num_clients=50, partition="dirichlet", alpha=0.5),
        # enough rounds that the kill lands mid-job: a round of this job takes milliseconds
        training=TrainingSpec(rounds=ROUNDS, clients_per_round=10, local_epochs=1, batch_size=16, lr=0.1),
        resources=ResourceSpec(num_workers=2, clients_per_call=5, num_cpus=2),
    )


def test_resume_after_the_driver_is_killed(ray_session, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(_spec().to_yaml())
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "fedray.orchestrator.cli", "run", str(job), "--quiet", "--checkpoint-dir", str(ck)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (ck / "round-000002.pt").exists():
        assert first.poll() is None or (ck / "round-000002.pt").exists(), "the first driver ended before round 2"
        assert time.monotonic() < deadline, "no round-2 checkpoint in time"
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    assert not (ck / f"round-{ROUNDS:06d}.pt").exists(), "the job finished before the kill: raise ROUNDS"
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming resume after round" in done.stdout + done.stderr
    resumed = LocalDirStore(ck).load_latest()
    assert resumed["round"] == ROUNDS and [r["round"] for r in resumed["rounds"]] == list(range(1, ROUNDS + 1))
    clean = run_job(_spec(), progress=False, log=lambda s: None)
    for k, v in clean.params.items():
        assert torch.equal(resumed["params"][k], v), k
