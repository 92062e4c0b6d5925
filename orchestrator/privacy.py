"""Differential privacy for federated rounds (DP-FedAvg, McMahan et al. 2018), pure code.

The mechanism per round: every sampled client's delta is clipped to L2 norm `clip_norm`
(`clip_update`, applied before the update is folded in), the server averages with uniform
weights over the planned number of clients n, and adds Gaussian noise of std
noise_multiplier * clip_norm / n to the mean (`add_gaussian_noise`). With Poisson sampling of
clients at rate q this is the sampled Gaussian mechanism, whose privacy `RDPAccountant` tracks
(Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism").
The guarantee is client-level (add/remove one client's whole data).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from fedray.config import DPSpec, SpecError

from .aggregation import clip_update

__all__ = [
    "DEFAULT_ORDERS",
    "DPSpec",
    "RDPAccountant",
    "add_gaussian_noise",
    "clip_update",
    "compute_rdp",
    "noise_generator",
    "noise_secret",
    "rdp_to_epsilon",
]

# The order grid of Google's dp_accounting (DEFAULT_RDP_ORDERS): fractional orders 1.1..10.9,
# where the best order lies for large epsilon, integers 11..63, and four large ones for very small
# q. With the same grid our epsilon is never above dp_accounting's (tests/test_privacy_audit.py).
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10 for x in range(1, 100)) + tuple(float(a) for a in range(11, 64)) + (128.0, 256.0, 512.0, 1024.0)
)


def noise_secret(spec: DPSpec, environ: Mapping[str, str] = os.environ) -> bytes:
    """The job's noise secret: from the driver's `spec.noise_secret_env` (hex) if set, else 32
    fresh random bytes. Nothing a client is told (job seed, spec, tokens) determines it.

    Raises:
        SpecError: the variable is set but not hex of at least 16 bytes.
    """

    raw = environ.get(spec.noise_secret_env)
    if not raw:
        return secrets.token_bytes(32)
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise SpecError(f"privacy.noise_secret_env: ${spec.noise_secret_env} must hold at least 32 hex digits, "
                        f"got {len(raw)} characters")
    return key


def noise_generator(secret: bytes, round: int) -> torch.Generator:
    """The noise generator of one round, from (noise secret, round) alone, so a resumed job (which
    restores the secret from its checkpoint) adds the same noise. The seed is an HMAC of the
    round under the secret: without the secret, no participant can regenerate the noise.

    Raises:
        TypeError: `secret` is not bytes (the job seed is public and must not seed the noise).
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise TypeError("noise_generator needs the job's noise secret (>= 16 bytes, `noise_secret`), "
                        "not the public job seed")
    mac = hmac.new(bytes(secret), f"fedray-dp-noise:{int(round)}".encode(), hashlib.sha256).digest()
    return torch.Generator().manual_seed(int.from_bytes(mac[:8], "big") >> 1)


def add_gaussian_noise(mean_update: Mapping[str, torch.Tensor], *, noise_multiplier: float, clip_norm: float,
                       num_clients: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """mean_update + N(0, sigma^2 I) per coordinate, sigma = noise_multiplier * clip_norm / num_clients.

    This is the Gaussian mechanism on the sum of num_clients deltas each clipped to clip_norm,
    divided by num_clients. It holds for the uniform-weight mean only: with weights w_i one client
    moves the mean by up to clip_norm * max_i w_i / sum w, so run DP rounds with weight 1 for every
    update. num_clients must be the planned count (clients per round), not the count that arrived,
    which itself depends on the data. Noise is drawn in float64, tensors in sorted name order; the
    input is not changed.

    Raises:
        ValueError: noise_multiplier < 0, clip_norm <= 0 or num_clients < 1.
    """
    if isinstance(noise_multiplier, bool) or not (isinstance(noise_multiplier, (int, float)) and 0 <= noise_multiplier < math.inf):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if isinstance(clip_norm, bool) or not (isinstance(clip_norm, (int, float)) and 0 < clip_norm < math.inf):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    std = noise_multiplier * clip_norm / num_clients
    out = {}
    for k in sorted(mean_update):
        x = mean_update[k]
        noise = torch.randn(x.shape, dtype=torch.float64, generator=generator) * std
        out[k] = (x.to(torch.float64) + noise).to(x.dtype)
    return {k: out[k] for k in mean_update}


# -- RDP of the sampled Gaussian mechanism -------------------------------------------------------

def _logsumexp(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x != -math.inf]
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha (Mironov et al. 2019, Sec. 3.3):
    A = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)); all terms are positive."""
    lq, l1q = math.log(q), math.log1p(-q)
    return _logsumexp(_log_comb(alpha, k) + k * lq + (alpha - k) * l1q + (k * k - k) / (2 * sigma ** 2)
                      for k in range(alpha + 1))


def _log_erfc(x: float) -> float:
    if x < 25:
        return math.log(math.erfc(x))
    # Asymptotic series; erfc underflows to 0 past x ~ 26.5.
    x2 = x * x
    return -x2 - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-0.5 / x2 + 0.75 / x2 ** 2 - 1.875 / x2 ** 3)


_MAX_TERMS = 5000


def _log_add(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha > 1 (Mironov et al. 2019, Sec. 3.3): A splits at
    z0 = sigma^2 log(1/q - 1) + 1/2 into two series of generalized-binomial terms with erfc tails.
    The coefficients C(alpha, i) change sign past i = alpha; positive and negative terms are summed
    apart (in log space) and subtracted once. Returns inf (a valid, useless bound that drops the
    order out of the minimum) if the series has not converged after _MAX_TERMS terms."""
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    lq, l1q, s2 = math.log(q), math.log1p(-q), math.sqrt(2) * sigma
    log_pos = log_neg = -math.inf
    log_c, sign = 0.0, 1.0  # C(alpha, 0) = 1
    last0 = last1 = math.inf
    for i in range(_MAX_TERMS):
        j = alpha - i
        t0 = log_c + i * lq + j * l1q + (i * i - i) / (2 * sigma ** 2) + math.log(0.5) + _log_erfc((i - z0) / s2)
        t1 = log_c + j * lq + i * l1q + (j * j - j) / (2 * sigma ** 2) + math.log(0.5) + _log_erfc((z0 - j) / s2)
        if sign > 0:
            log_pos = _log_add(log_pos, _log_add(t0, t1))
        else:
            log_neg = _log_add(log_neg, _log_add(t0, t1))
        # Stop once both series shrink and their terms are e^-30 below the running sum.
        if i > alpha and t0 < last0 and t1 < last1 and max(t0, t1) < log_pos - 30:
            break
        last0, last1 = t0, t1
        # C(alpha, i+1) = C(alpha, i) (alpha - i) / (i + 1)
        r = (alpha - i) / (i + 1)
        sign = sign if r > 0 else -sign
        log_c += math.log(abs(r))
    else:
        return math.inf
    if log_neg == -math.inf:
        return log_pos
    if log_neg >= log_pos:
        return math.inf  # cancellation ate the precision; same fallback as non-convergence
    return log_pos + math.log1p(-math.exp(log_neg - log_pos))


def compute_rdp(*, noise_multiplier: float, sample_rate: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each order: log(A_alpha) / (alpha - 1).

    q = 1 gives the Gaussian mechanism, alpha / (2 sigma^2), exactly; q = 0 gives 0; sigma = 0
    gives inf (for q > 0).

    Raises:
        ValueError: noise_multiplier < 0, sample_rate outside [0, 1], or an order <= 1.
    """
    sigma, q = noise_multiplier, sample_rate
    if not (isinstance(sigma, (int, float)) and 0 <= sigma < math.inf):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {sigma!r}")
    if not (isinstance(q, (int, float)) and 0 <= q <= 1):
        raise ValueError(f"sample_rate must be in [0, 1], got {q!r}")
    out = np.empty(len(orders))
    for n, a in enumerate(orders):
        if not (isinstance(a, (int, float, np.integer, np.floating)) and a > 1):
            raise ValueError(f"RDP orders must be numbers > 1, got {a!r}")
        a = float(a)
        if q == 0:
            out[n] = 0.0
        elif sigma == 0 or math.isinf(a):
            out[n] = math.inf
        elif q == 1:
            out[n] = a / (2 * sigma ** 2)
        elif a.is_integer():
            out[n] = _log_a_int(q, sigma, int(a)) / (a - 1)
        else:
            out[n] = _log_a_frac(q, sigma, a) / (a - 1)
    return out


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float, *,
                   conversion: str = "improved") -> tuple[float, float]:
    """(epsilon, best order) for a given delta, minimised over the orders.

    conversion="improved" (default; Balle et al. 2020 "Hypothesis testing interpretations and
    Rényi DP", Thm. 21, as in Google's dp_accounting and Opacus):
        eps = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)
    conversion="classic" (Mironov 2017, Prop. 3): eps = rdp + log(1/delta) / (alpha - 1).
    Both are valid upper bounds; the improved one is never larger. An order whose RDP is so small
    that delta^2 >= 1 - exp(-rdp) gives eps = 0.

    Raises:
        ValueError: delta outside (0, 1), unknown conversion, or orders and rdp of other lengths.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if conversion not in ("improved", "classic"):
        raise ValueError(f"conversion must be 'improved' or 'classic', got {conversion!r}")
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"{len(a)} orders but {len(r)} RDP values")
    with np.errstate(invalid="ignore", divide="ignore"):
        if conversion == "classic":
            eps = r + math.log(1 / delta) / (a - 1)
        else:
            eps = r - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    eps = np.where(np.isnan(eps), np.inf, eps)
    # A second bound, for tiny RDP: KL <= D_alpha and delta <= sqrt(1 - exp(-KL)) (Bretagnolle-Huber),
    # so eps = 0 already holds when delta^2 >= 1 - exp(-rdp) (as in dp_accounting).
    eps = np.where(delta ** 2 + np.expm1(-r) > 0, 0.0, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


class RDPAccountant:
    """Privacy spent by rounds of the sampled Gaussian mechanism.

    RDP composes additively, so after n steps the RDP at each order is n times one step's.
    Picklable; `state_dict()` / `load_state_dict()` carry the step count for checkpoints.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, *, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        """
        Raises:
            ValueError: as `compute_rdp`.
        """
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.orders = tuple(float(a) for a in orders)
        self._rdp_step = compute_rdp(noise_multiplier=noise_multiplier, sample_rate=sample_rate, orders=self.orders)
        self.steps = 0

    def step(self, n: int = 1) -> None:
        """Record n more rounds.

        Raises:
            ValueError: n < 0.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        self.steps += n

    @property
    def rdp(self) -> np.ndarray:
        """Composed RDP at each of `orders`."""
        return self._rdp_step * self.steps if self.steps else np.zeros(len(self.orders))

    def epsilon(self, delta: float, *, conversion: str = "improved") -> float:
        """The epsilon spent so far at this delta (see `rdp_to_epsilon`).

        Raises:
            ValueError: delta outside (0, 1).
        """
        return self.get_privacy_spent(delta, conversion=conversion)[0]

    def get_privacy_spent(self, delta: float, *, conversion: str = "improved") -> tuple[float, float]:
        """(epsilon, best order) spent so far."""
        return rdp_to_epsilon(self.orders, self.rdp, delta, conversion=conversion)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """
        Raises:
            ValueError: the state is of another noise multiplier or sample rate.
        """
        if (state["noise_multiplier"], state["sample_rate"]) != (self.noise_multiplier, self.sample_rate):
            raise ValueError(f"accountant state is for noise_multiplier={state['noise_multiplier']}, "
                             f"sample_rate={state['sample_rate']}, not {self.noise_multiplier}, {self.sample_rate}")
        self.steps = int(state["steps"])
