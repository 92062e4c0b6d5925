"""OMC's fused CPU kernels, compiled with numba (imported only through `omc_kernels`, which
falls back to its torch implementations when numba is missing or FEDRAY_OMC_NUMBA=0).

Each kernel is one call over a whole variable's flat arrays and holds no fp32 copy of it:

- `update_range(codes, grad, k, scratch)`: min and max of u = codes + k * grad (the updated
  values in the variable's current code units), through a small float32 scratch (chunks of
  `scratch.size` values: the min / max reduction vectorizes as integer compares of the float
  bits there, not in the fused loop);
- `requantize(codes, grad, k, s, off, top, stochastic, key, counter)`: codes = clamp(floor(
  (codes + k * grad) * s + off + r), 0, top) in place;
- `quantize(w, lo, inv_alpha, top, stochastic, key, counter, codes)`: codes = clamp(floor(
  (w - lo) * inv_alpha + r), 0, top);
- `step_flat(...)`: the two above for every variable of a flat code / gradient array in one
  call (a small model's whole step).

r is the stochastic-rounding offset, (b + 1/2) * 2**-16 with b 16 random bits: value i takes
bits 16 (i % 4) .. 16 (i % 4) + 15 of SplitMix64 output number counter + i // 4 of the stream of
`key` (the same bits as `omc_kernels.random16_torch`); or 1/2 (round to nearest) unless
`stochastic`. An empty `grad` means no gradient (k is ignored). `key` and `counter` are
np.uint64; a call uses ceil(n / 4) outputs.
"""

from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["quantize", "requantize", "step_flat", "update_range"]

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S48 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(48)
_SIGN = np.int32(31)
_MAG = np.int32(0x7FFFFFFF)
_R16 = np.float32(2.0 ** -16)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_HASHES = 256  # SplitMix64 outputs per chunk (1024 values, 2 KiB of random bits)

_opts = dict(nogil=True, cache=True, error_model="numpy")


@nb.njit(inline="always", **_opts)
def _splitmix(key, pos):  # noqa: ANN001
    z = key + (pos + np.uint64(1)) * _G
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@nb.njit(inline="always", **_opts)
def _hashes(key, pos, out):  # noqa: ANN001
    for j in range(out.size):
        out[j] = _splitmix(key, pos + np.uint64(j))


@nb.njit(inline="always", **_opts)
def _offset(r16, i):  # noqa: ANN001
    return (np.float32(r16[i]) + _HALF) * _R16


@nb.njit(inline="always", fastmath=True, **_opts)
def _fill(codes, grad, k, out):  # noqa: ANN001
    for i in range(codes.size):
        out[i] = np.float32(codes[i]) + k * grad[i]


@nb.njit(inline="always", **_opts)
def _fill_codes(codes, out):  # noqa: ANN001
    for i in range(codes.size):
        out[i] = np.float32(codes[i])


@nb.njit(inline="always", **_opts)
def _minmax_keys(v, lo, hi):  # noqa: ANN001
    # float32 bits as int32, made monotonic (negative floats: flip the magnitude bits)
    for i in range(v.size):
        b = v[i]
        key = b ^ ((b >> _SIGN) & _MAG)
        lo = min(lo, key)
        hi = max(hi, key)
    return lo, hi


@nb.njit(inline="always", **_opts)
def _range(codes, grad, kk, scratch):  # noqa: ANN001
    n, c = codes.size, scratch.size
    keys = scratch.view(np.int32)
    lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
    for s in range(0, n, c):
        e = min(n, s + c)
        if grad.size:
            _fill(codes[s:e], grad[s:e], kk, scratch[: e - s])
        else:
            _fill_codes(codes[s:e], scratch[: e - s])
        lo, hi = _minmax_keys(keys[: e - s], lo, hi)
    out = np.empty(2, np.int32)
    out[0] = lo ^ ((lo >> _SIGN) & _MAG)
    out[1] = hi ^ ((hi >> _SIGN) & _MAG)
    f = out.view(np.float32)
    return float(f[0]), float(f[1])


@nb.njit(**_opts)
def update_range(codes, grad, k, scratch):  # noqa: ANN001
    return _range(codes, grad, np.float32(k), scratch)


@nb.njit(inline="always", **_opts)
def _requant_rand(codes, grad, r16, kk, ss, oo, tt):  # noqa: ANN001
    for i in range(codes.size):
        u = np.float32(codes[i]) + kk * grad[i]
        codes[i] = min(max(u * ss + oo + _offset(r16, i), _ZERO), tt)  # truncation == floor on [0, top]


@nb.njit(inline="always", **_opts)
def _requant_rand_nograd(codes, r16, ss, oo, tt):  # noqa: ANN001
    for i in range(codes.size):
        codes[i] = min(max(np.float32(codes[i]) * ss + oo + _offset(r16, i), _ZERO), tt)


@nb.njit(inline="always", **_opts)
def _quant_rand(w, codes, r16, ll, ia, tt):  # noqa: ANN001
    for i in range(w.size):
        codes[i] = min(max((w[i] - ll) * ia + _offset(r16, i), _ZERO), tt)


@nb.njit(inline="always", **_opts)
def _requant(codes, grad, kk, ss, oo, tt, stochastic, key, counter):  # noqa: ANN001
    n = codes.size
    if not stochastic:
        if grad.size:
            for i in range(n):
                u = np.float32(codes[i]) + kk * grad[i]
                codes[i] = min(max(u * ss + oo + _HALF, _ZERO), tt)
        else:
            for i in range(n):
                codes[i] = min(max(np.float32(codes[i]) * ss + oo + _HALF, _ZERO), tt)
        return
    bits = np.empty(_HASHES, np.uint64)  # random bits of one chunk; four 16-bit offsets each
    r16 = bits.view(np.uint16)
    for s0 in range(0, n, 4 * _HASHES):
        e = min(n, s0 + 4 * _HASHES)
        _hashes(key, counter + np.uint64(s0 // 4), bits[: (e - s0 + 3) // 4])
        if grad.size:
            _requant_rand(codes[s0:e], grad[s0:e], r16[: e - s0], kk, ss, oo, tt)
        else:
            _requant_rand_nograd(codes[s0:e], r16[: e - s0], ss, oo, tt)


@nb.njit(**_opts)
def requantize(codes, grad, k, s, off, top, stochastic, key, counter):  # noqa: ANN001
    _requant(codes, grad, np.float32(k), np.float32(s), np.float32(off), np.float32(top), stochastic, key, counter)


@nb.njit(**_opts)
def step_flat(codes, grads, starts, has_grad, alphas, betas, lr, top, stochastic, key, counter, scratch):  # noqa: ANN001
    """SGD step of several variables held in one flat code array and one flat gradient array
    (variable v at starts[v] .. starts[v + 1] - 1): for each one with has_grad[v], the range of
    the update, a refitted transform (as `omc.fit_transform` for the int format: written back
    into alphas / betas) and the codes rewritten, in order, each taking ceil(n / 4) outputs of
    the random stream from `counter`. Returns the counter after the last."""
    tt = np.float32(top)
    for v in range(starts.size - 1):
        if not has_grad[v]:
            continue
        s, e = starts[v], starts[v + 1]
        alpha, beta = alphas[v], betas[v]
        kk = np.float32(-lr / alpha)
        lo, hi = _range(codes[s:e], grads[s:e], kk, scratch)
        vmin, vmax = alpha * lo + beta, alpha * hi + beta
        a2 = float(np.float32((vmax - vmin) / top))
        if not (a2 > 0.0 and np.isfinite(a2)):
            a2 = 1.0
        b2 = float(np.float32(vmin))
        _requant(codes[s:e], grads[s:e], kk, np.float32(alpha / a2), np.float32((beta - b2) / a2), tt, stochastic, key,
                 counter)
        if stochastic:
            counter += np.uint64((e - s + 3) // 4)
        alphas[v], betas[v] = a2, b2
    return counter


@nb.njit(**_opts)
def quantize(w, lo, inv_alpha, top, stochastic, key, counter, codes):  # noqa: ANN001
    ll, ia, tt = np.float32(lo), np.float32(inv_alpha), np.float32(top)
    n = w.size
    if not stochastic:
        for i in range(n):
            codes[i] = min(max((w[i] - ll) * ia + _HALF, _ZERO), tt)
        return
    bits = np.empty(_HASHES, np.uint64)
    r16 = bits.view(np.uint16)
    for s0 in range(0, n, 4 * _HASHES):
        e = min(n, s0 + 4 * _HASHES)
        _hashes(key, counter + np.uint64(s0 // 4), bits[: (e - s0 + 3) // 4])
        _quant_rand(w[s0:e], codes[s0:e], r16[: e - s0], ll, ia, tt)
