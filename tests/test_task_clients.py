"""The same user task (examples/custom_cnn) as real-client processes next to simulated clients,
through the one client step: a stateful codec and P2U broadcasts; and the receive/send API."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

from fedray.compression import get_codec
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.spec import CompressionSpec, JobSpec, ResourceSpec, ServiceSpec, TaskSpec
from fedray.proto.auth import client_token

ROOT = Path(__file__).resolve().parents[1]
CNN_DIR = ROOT / "examples" / "custom_cnn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_codecs_declare_state():
    assert get_codec("ef", inner="int8").stateful and get_codec("powersgd").stateful
    assert get_codec("zstd", inner="ef", inner_params={"inner": "int8"}).stateful  # zstd keeps ef's memory
    assert not get_codec("zstd", inner="int8").stateful and not get_codec("int8").stateful
    assert get_codec("pipeline", stages=["ef", {"codec": "topk", "ratio": 0.1}]).stateful


def test_custom_cnn_as_real_client_processes(ray_session, monkeypatch):
    port, secret, job_id = _free_port(), "cnn-secret", "cnn-real"
    monkeypatch.setenv("FEDRAY_JOB_SECRET", secret)
    spec = JobSpec.from_yaml(CNN_DIR / "job.yaml")
    spec = dataclasses.replace(
        spec, task=TaskSpec(spec.task.target, {"num_clients": 20, "per_client": 40, "test_size": 500}),
        training=dataclasses.replace(spec.training, rounds=2, clients_per_round=3, local_epochs=1),
        compression=CompressionSpec(codec="zstd", codec_params={"inner": "ef", "inner_params": {"inner": "int8"}},
                                    broadcast="p2u", broadcast_params={"stage_bits": [4, 4], "start_after": 0}),
        resources=ResourceSpec(num_workers=1, shards=2),
        service=ServiceSpec(port=port, real_clients=2, real_client_wait_s=120, job_id=job_id))
    # Real clients 1000 and 1002 read their own slices (ids beyond the 20 simulated clients).
    params = '{"num_clients": 1100, "per_client": 40, "test_size": 10}'
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedray.orchestrator.realclient_cli", "client", "--server", f"127.0.0.1:{port}",
             "--job-id", job_id, "--client-id", str(cid), "--token", client_token(secret, job_id, cid),
             "--task", "cnn_task:FashionCNN", "--task-params", params, "--timeout", "200"],
            cwd=CNN_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cid in (1000, 1002)
    ]
    try:
        result = run_job(spec, base_dir=str(CNN_DIR), progress=False, log=lambda s: None)
    finally:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    assert [r.clients for r in result.rounds] == [5, 5], outs  # 3 simulated + 2 real per round
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "trained in rounds [1, 2]" in out, out
    assert result.final_accuracy > 0.2


def test_receive_send_with_the_users_own_loop(ray_session, monkeypatch):
    import fedray
    from fedray.workers.data import load_digits

    port, secret, job_id = _free_port(), "rs-secret", "rs-job"
    monkeypatch.setenv("FEDRAY_JOB_SECRET", secret)
    spec = JobSpec.from_dict({
        "name": "rs", "seed": 2, "data": {"dataset": "digits", "num_clients": 10}, "model": {"hidden": [16]},
        "training": {"rounds": 2, "clients_per_round": 3, "local_epochs": 1, "batch_size": 16},
        "compression": {"codec": "ef", "codec_params": {"inner": "int8"}},
        "resources": {"num_workers": 1}, "service": {"port": port, "real_clients": 1, "real_client_wait_s": 90,
                                                     "job_id": job_id}})
    d = load_digits(0)
    x = torch.from_numpy(d.x_train[:100].astype("float32") / 16.0)
    y = torch.from_numpy(d.y_train[:100])
    seen, sent = [], []

    def user_client():
        fl = fedray.connect(server=f"127.0.0.1:{port}", job_id=job_id, client_id=500,
                            token=client_token(secret, job_id, 500), timeout_s=150)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        while fl.is_running():
            model.load_state_dict(fl.receive())
            seen.append(fl.round)
            for _ in range(3):  # the user's own loop, unchanged
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            sent.append(fl.send(model.state_dict(), num_examples=len(y), metrics={"loss": loss.item()}))
        fl.close()

    t = threading.Thread(target=user_client, daemon=True)
    t.start()
    result = run_job(spec, progress=False, log=lambda s: None)
    t.join(timeout=60)
    assert seen == [1, 2] and all(a["accepted"] for a in sent)
    assert [r.clients for r in result.rounds] == [4, 4]  # 3 simulated + the user's own loop
