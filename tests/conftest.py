"""Shared fixtures. One local Ray per test session (Ray's own conftest style: one starter, thin
named fixtures); gRPC servers bind 127.0.0.1 port 0."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _ray_start(**kwargs):
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
             logging_level="WARNING", **kwargs)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs, small object store), started once and shut down at the end."""
    ray = _ray_start()
    yield ray
    ray.shutdown()
