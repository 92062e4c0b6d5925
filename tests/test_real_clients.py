"""Real clients (separate processes, gRPC only) take part in a live job next to simulated ones;
TLS and mutual TLS on the service."""

from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import pytest
import torch

from fedray.compression import get_codec
from fedray.orchestrator.engine import run_job
from fedray.orchestrator.service import AggregationCore, create_server
from fedray.orchestrator.spec import DataSpec, DropoutSpec, JobSpec, ResourceSpec, ServiceSpec, TrainingSpec
from fedray.proto import serde
from fedray.proto.auth import client_token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_client_processes_join_a_live_job(ray_session, monkeypatch):
    port, secret, job_id = _free_port(), "real-client-secret", "rc-job"
    monkeypatch.setenv("FEDRAY_JOB_SECRET", secret)
    spec = JobSpec(
        name="rc", seed=1,
        data=DataSpec(dataset="digits", num_clients=30),
        training=TrainingSpec(rounds=2, clients_per_round=6, local_epochs=1, batch_size=16),
        resources=ResourceSpec(num_workers=1, shards=2),
        service=ServiceSpec(port=port, real_clients=2, real_client_wait_s=90, job_id=job_id),
        # Real clients cut their Federated Dropout subnets as simulated ones do (the shard checks
        # the subnet seed and keep rate of every upload against its own derivation).
        dropout=DropoutSpec(keep_rates=(0.5, 1.0), mode="drawn"),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedray.orchestrator.realclient_cli", "client", "--server", f"127.0.0.1:{port}",
             "--job-id", job_id, "--client-id", str(cid), "--token", client_token(secret, job_id, cid),
             "--dataset", "digits", "--data-shard", f"{i}/2", "--timeout", "150"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, cid in enumerate((1000, 1002))  # both start at shard 0; GetJob sends 1002 to shard 1
    ]
    try:
        result = run_job(spec, progress=False, log=lambda s: None)
    finally:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [r.clients for r in result.rounds] == [8, 8], outs  # 6 simulated + 2 real per round
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "trained in rounds [1, 2]" in out, out


def test_real_client_with_a_bad_token_is_refused(ray_session):
    core = AggregationCore(job_id="j", secret="s", shapes={"w": (2,)})
    server, port = create_server(core)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "fedray.orchestrator.realclient_cli", "client", "--server", f"127.0.0.1:{port}",
             "--job-id", "j", "--client-id", "5", "--token", "forged", "--dataset", "digits", "--timeout", "20"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=fedray-test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {k: str(d / k) for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _upload(channel):
    msgs = serde.upload_messages(job_id="j", round=1, client_id=3, weight=1.0,
                                 tensors=[("w", get_codec("identity").encode(torch.ones(4)))])
    return serde.call_upload(channel, msgs, token=client_token("s", "j", 3), timeout=10)


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(certs, mutual):
    tls = serde.TLSConfig(certs["server.pem"], certs["server.key"], certs["ca.pem"] if mutual else None)
    core = AggregationCore(job_id="j", secret="s", shapes={"w": (4,)})
    server, port = create_server(core, "127.0.0.1:0", tls=tls)
    core.open_round(1)
    addr = f"127.0.0.1:{port}"
    try:
        with pytest.raises(grpc.RpcError) as e:  # plaintext to a TLS port
            _upload(serde.open_channel(addr))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        if mutual:
            with pytest.raises(grpc.RpcError):  # TLS without a client certificate
                _upload(serde.open_channel(addr, ca_file=certs["ca.pem"]))
            ch = serde.open_channel(addr, ca_file=certs["ca.pem"], cert_file=certs["client.pem"], key_file=certs["client.key"])
        else:
            ch = serde.open_channel(addr, ca_file=certs["ca.pem"])
        assert _upload(ch)["accepted"]
        assert core.close_round(1)["count"] == 1
    finally:
        server.stop(None)
