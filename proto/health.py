"""The standard gRPC health-checking protocol (`grpc.health.v1`, package grpcio-health-checking).

Served next to fedray's own `Health` on every aggregation shard so that Kubernetes gRPC probes,
`grpc_health_probe` and load balancers can ask whether a shard serves. Its generated code stays
here, as fedray's own stays in `serde`.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

__all__ = ["AGGREGATION_SERVICE", "StandardHealth", "add_standard_health"]

# The service name probes may ask about; "" (the whole server) answers the same.
AGGREGATION_SERVICE = "fedray.v1.Aggregation"


class StandardHealth:
    """The server's `grpc.health.v1.Health` status: SERVING or NOT_SERVING, for "" and the
    Aggregation service alike."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._servicer = servicer

    def serving(self) -> None:
        for name in ("", AGGREGATION_SERVICE):
            self._servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    def not_serving(self) -> None:
        for name in ("", AGGREGATION_SERVICE):
            self._servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def shutdown(self) -> None:
        """NOT_SERVING from now on, whatever is set later (the server is stopping)."""
        self._servicer.enter_graceful_shutdown()


def add_standard_health(server: grpc.Server) -> StandardHealth:
    """Register `grpc.health.v1.Health` on `server` (before it starts); status starts NOT_SERVING."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    h = StandardHealth(servicer)
    h.not_serving()
    return h
