"""The same user task (examples/custom_cnn) as real clients next to simulated ones: `fedray client
--task` processes and a receive/send loop, through the one client step."""

from __future__ import annotations

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


def _own_loop(port: int, secret: str, job_id: str, seen: list, sent: list) -> None:
    """A user's script with its own model and training loop (receive/send API)."""
    import fedray

    sys.path.insert(0, str(CNN_DIR))
    from cnn_task import FashionCNN, SmallCNN

    data = FashionCNN(num_clients=1100, per_client=40).client_data(1004)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    fl = fedray.connect(server=f"127.0.0.1:{port}", job_id=job_id, client_id=1004,
                        token=client_token(secret, job_id, 1004), timeout_s=200)
    model = SmallCNN(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    while fl.is_running():
        model.load_state_dict(fl.receive(), strict=False)  # num_batches_tracked stays local
        seen.append(fl.round)
        model.train()
        for _ in range(2):  # the user's own loop, unchanged
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        sent.append(fl.send(model.state_dict(), num_examples=len(y), metrics={"loss": loss.item()}))
    fl.close()


def test_custom_cnn_as_real_clients_next_to_simulated_ones(ray_session, monkeypatch):
    """Two `fedray client --task` processes and one receive/send loop join 3 simulated clients
    per round, with a stateful codec (zstd around error feedback) and P2U broadcasts."""
    port, secret, job_id = _free_port(), "cnn-secret", "cnn-real"
    monkeypatch.setenv("FEDRAY_JOB_SECRET", secret)
    spec = JobSpec.from_yaml(CNN_DIR / "job.yaml")
    spec = spec.replace(
        task=TaskSpec(target=spec.task.target, params={"num_clients": 20, "per_client": 40, "test_size": 500}),
        training=spec.training.replace(rounds=2, clients_per_round=3, local_epochs=1),
        compression=CompressionSpec(codec="zstd", codec_params={"inner": "ef", "inner_params": {"inner": "int8"}},
                                    broadcast="p2u", broadcast_params={"stage_bits": [4, 4], "start_after": 0}),
        resources=ResourceSpec(num_workers=1, shards=2),
        service=ServiceSpec(port=port, real_clients=3, real_client_wait_s=150, job_id=job_id))
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
    seen, sent = [], []
    loop = threading.Thread(target=_own_loop, args=(port, secret, job_id, seen, sent), daemon=True)
    loop.start()
    try:
        result = run_job(spec, base_dir=str(CNN_DIR), progress=False, log=lambda s: None)
    finally:
        outs = [p.communicate(timeout=90)[0] for p in procs]
        loop.join(timeout=60)
    assert [r.clients for r in result.rounds] == [6, 6], outs  # 3 simulated + 2 processes + 1 own loop
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "trained in rounds [1, 2]" in out, out
    assert seen == [1, 2] and all(a["accepted"] for a in sent)
    assert result.final_accuracy > 0.2
