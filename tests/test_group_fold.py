"""Several folded updates added in one pass over the float64 sum: the same bits as one by one."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from fedray.compression import get_codec
from fedray.compression.accumulate import ADD_BLOCK, ScaledAdd, add_scaled_, add_scaled_many_
from fedray.orchestrator.aggregation import RunningWeightedSum
from fedray.orchestrator.service import AggregationCore, ServiceLimits
from fedray.proto import serde
from fedray.proto.auth import client_token

N = ADD_BLOCK + 12_345  # over one block, with a short last block


def test_add_scaled_many_is_bit_identical_to_one_by_one():
    rng = np.random.default_rng(3)
    start = torch.from_numpy(rng.standard_normal(N) * 1e3)  # values whose sums round
    terms = [(rng.integers(-127, 128, N).astype(np.int8), float(rng.uniform(1e-4, 3.0))) for _ in range(3)]
    terms.append((torch.from_numpy(rng.standard_normal(N).astype(np.float32)), 0.1))
    one, many = start.clone(), start.clone()
    for src, alpha in terms:
        add_scaled_(one, src, alpha)
    add_scaled_many_(many, terms)
    assert torch.equal(one, many)
    assert not torch.equal(many, start)


def _folds(codec, rng, shapes):
    out = {}
    for k, s in shapes.items():
        p = codec.encode(torch.from_numpy(rng.standard_normal(s).astype(np.float32)))
        out[k] = codec.fold(p)
    return out


def test_add_folds_many_equals_add_folds_in_order_and_checks_all_first():
    rng = np.random.default_rng(4)
    shapes = {"w": (N // 100, 100), "b": (7,)}
    codec = get_codec("int8")
    ups = [(_folds(codec, rng, shapes), float(rng.uniform(0.5, 40.0))) for _ in range(5)]
    assert all(isinstance(f, ScaledAdd) for f in ups[0][0].values())
    one, many = RunningWeightedSum(shapes), RunningWeightedSum(shapes)
    for folds, w in ups:
        one.add_folds(folds, w)
    many.add_folds_many(ups)
    for k in shapes:
        assert torch.equal(one.sums[k], many.sums[k]), k
    assert (one.total_weight, one.count) == (many.total_weight, many.count)
    before = {k: v.clone() for k, v in many.sums.items()}
    with pytest.raises(ValueError, match="weight"):
        many.add_folds_many([ups[0], (ups[1][0], float("nan"))])
    assert all(torch.equal(before[k], many.sums[k]) for k in shapes) and many.count == 5


def test_concurrent_folded_uploads_all_count_once():
    """Sixteen uploads commit at once through one stripe (max_active=1), so they queue and add in
    groups; every one is acked, counted once and in the sum. Weights 1 and int8 codes make every
    partial sum exact in float64, so the sum equals the one-by-one reference whatever the order."""
    shapes = {"w": (N // 100, 100)}
    job, secret = "group", "s"
    core = AggregationCore(job_id=job, secret=secret, shapes=shapes, limits=ServiceLimits(max_active=1))
    core.open_round(1)
    codec = get_codec("int8")
    rng = np.random.default_rng(5)
    xs = [torch.from_numpy(rng.standard_normal(shapes["w"]).astype(np.float32)) for _ in range(16)]
    errors: list[BaseException] = []
    go = threading.Barrier(len(xs))

    def send(cid: int) -> None:
        try:
            msgs = serde.upload_messages(job_id=job, round=1, client_id=cid, weight=1.0,
                                         tensors=[("w", codec.encode(xs[cid]))])
            go.wait(timeout=30)
            core.upload(serde._header(msgs[0].header), ((m.offset, m.data) for m in msgs),
                        client_token(secret, job, cid))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    part = core.close_round(1)
    assert part["count"] == len(xs) and part["total_weight"] == float(len(xs))
    ref = RunningWeightedSum(shapes)
    for x in xs:
        ref.add_folds({"w": codec.fold(codec.encode(x))}, 1.0)
    assert torch.equal(part["sums"]["w"], ref.sums["w"])


def test_fused_kernels_give_torch_bits_across_sizes_groups_and_tails():
    """The numba pass (`fold_kernels`, where it loads) gives exactly the bits of torch's
    widening copy and add_(alpha) per term, one term after the other: sizes with odd tails after
    the vector loop, groups of 1 to 9 terms (split into passes of 8, 4, 2, 1), int8 and float32
    sources, read-only payload views and writable copies mixed."""
    from fedray.compression import accumulate

    if os.environ.get("FEDRAY_FOLD_NUMBA", "1") == "0":
        pytest.skip("fused fold kernels turned off (FEDRAY_FOLD_NUMBA=0)")
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch's add has no fused multiply-add on this CPU: the kernels stand aside")
    from fedray.compression import fold_numba

    # numba is a dependency: on an FMA CPU the kernels must load, pass the check and be used
    assert accumulate.fold_kernels() is fold_numba
    rng = np.random.default_rng(11)
    for n in (ADD_BLOCK + 1, ADD_BLOCK + 15, 2 * ADD_BLOCK + 12_345):
        start = torch.from_numpy(rng.standard_normal(n))
        srcs = []
        for i in range(9):
            if i == 4:
                s = rng.standard_normal(n).astype(np.float32)
            else:
                s = rng.integers(-127, 128, n).astype(np.int8)
            if i % 2:  # a payload view: read-only bytes
                s = np.frombuffer(s.tobytes(), s.dtype)
            srcs.append(s)
        alphas = [float(a) for a in rng.uniform(1e-3, 3.0, len(srcs))]
        for k in (1, 2, 3, 7, 9):
            terms = list(zip(srcs[:k], alphas[:k]))
            ref = start.clone()
            accumulate._torch_blocked(ref, [(accumulate.readonly_tensor(s), a) for s, a in terms], n)
            got = start.clone()
            add_scaled_many_(got, terms) if k > 1 else add_scaled_(got, *terms[0])
            assert torch.equal(got, ref), (n, k)
            assert not torch.equal(got, start)


@pytest.mark.parametrize("shapes,env,loads", [({"w": (64, 64), "b": (64,)}, None, False),
                                              ({"w": (ADD_BLOCK + 1,)}, None, True),
                                              ({"w": (8,)}, "always", True)])
def test_a_shard_loads_the_fold_kernels_only_for_a_model_that_uses_them(shapes, env, loads):
    """Only a tensor over ADD_BLOCK values folds through the numba kernels: a service for a
    smaller model does not load them (numba and LLVM: ~0.7 s of CPU and ~120 MB); a fresh
    process, so that no other test has loaded them already."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from fedray.compression import accumulate\n"
            "from fedray.orchestrator.service import AggregationCore\n"
            f"AggregationCore(job_id='j', secret='s', shapes={shapes!r})\n"
            "print(accumulate._loader is not None, 'numba' in sys.modules)\n")
    env_vars = {k: v for k, v in os.environ.items() if k != "FEDRAY_FOLD_NUMBA"}
    if env:
        env_vars["FEDRAY_FOLD_NUMBA"] = env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_vars, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    started, imported = out.stdout.split()
    assert started == str(loads) and (loads or imported == "False"), out.stdout
