"""The standard gRPC health-checking protocol (grpc.health.v1) on a live aggregation shard, asked
with grpcio-health-checking's own stub, as a Kubernetes probe or a load balancer would."""

from __future__ import annotations

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedray.orchestrator.shard import AggregationShard

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(stub, service=""):
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_shard_answers_the_standard_health_check(ray_session):
    shard = AggregationShard.remote(job_id="job-h", secret="s", shapes={"w": (4,)}, host="127.0.0.1")
    address = ray.get(shard.address.remote(), timeout=60)
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert _check(stub) == SERVING
        assert _check(stub, "fedray.v1.Aggregation") == SERVING
        with pytest.raises(grpc.RpcError) as e:
            _check(stub, "no.such.Service")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        ray.get(shard.finish.remote(), timeout=30)  # the job ended: fedray's own Health says NOT_SERVING too
        assert _check(stub) == NOT_SERVING
        assert _check(stub, "fedray.v1.Aggregation") == NOT_SERVING
    ray.kill(shard)


def test_stopping_server_answers_not_serving():
    from fedray.orchestrator.service import AggregationCore, create_server

    core = AggregationCore(job_id="job-h", secret="s", shapes={"w": (4,)})
    server, port = create_server(core, "127.0.0.1:0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert _check(health_pb2_grpc.HealthStub(ch)) == SERVING
    server.stop(grace=1.0).wait(5)
    # gRPC refuses new calls once stop() starts, so ask the servicer itself what a draining
    # server answers: NOT_SERVING, and a later serving() cannot undo it.
    servicer = server.standard_health._servicer
    server.standard_health.serving()
    assert servicer.Check(health_pb2.HealthCheckRequest(service=""), None).status == NOT_SERVING
