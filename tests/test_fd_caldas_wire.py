"""benchmarks/fd_caldas.py's wire: the randomized Hadamard rotation that Caldas et al. (and
Konecny et al. for uploads) apply before quantizing, on tensors whose sizes are not powers of 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedray.compression import get_codec

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import fd_caldas

    return fd_caldas


@pytest.mark.parametrize("n", [1, 3, 1000, 4096, 50_177])
def test_rotation_is_orthonormal_and_inverts(n):
    fc = _bench()
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.linspace(0.01, 3.0, n)
    y = fc.hadamard(x, seed=7)
    assert torch.allclose(y.norm(), x.norm(), rtol=1e-5)
    assert torch.allclose(fc.hadamard(y, seed=7, inverse=True), x, atol=1e-5 * float(x.abs().max()))
    if n >= 1000:  # the signs come from the seed: another seed is another rotation
        assert not torch.allclose(fc.hadamard(x, seed=8), y)
    assert sum(m for _, m in fc._pieces(n)) == n


def test_rotation_costs_no_bytes_and_spreads_outliers():
    """Same payload bytes with and without the rotation (no padding); on a heavy-tailed delta the
    2-bit stochastic upload's error is smaller rotated, since the range no longer follows the outliers."""
    fc = _bench()
    g = torch.Generator().manual_seed(0)
    delta = {"w": 0.01 * torch.randn(96, 777, generator=g) * torch.rand(96, 777, generator=g) ** 4}
    codec = get_codec("uniform", bits=2, mode="affine", rounding="stochastic")
    plain, nb_plain = fc._wire(codec, delta, 3)
    rot, nb_rot = fc._wire(codec, delta, 3, "hadamard")
    assert nb_plain == nb_rot == codec.wire_bytes((96, 777))
    err = lambda out: float((out["w"] - delta["w"]).norm() / delta["w"].norm())  # noqa: E731
    assert err(rot) < 0.7 * err(plain)
