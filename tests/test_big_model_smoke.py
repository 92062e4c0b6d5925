"""benchmarks/big_model.py's code path on a tiny transformer: one round through Ray worker actors
and the gRPC aggregation shard with int8 uploads and a P2U broadcast, and its P2U timing."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import big_model

    return big_model


def test_tiny_transformer_round_is_measured(ray_session):
    bm = _bench()
    task = bm.LMTask(**bm.TINY, num_clients=3, samples_per_client=4, seed=1)
    job = bm.run_config("tiny", task, clients=2, rounds=1, workers=1, seed=1, log=lambda m: None)
    assert 500_000 < job["params"] < 2_000_000 and job["fp32_bytes"] == 4 * job["params"]
    (r,) = job["per_round"]
    assert (r["clients"], r["failed"]) == (2, 0)
    # int8 uploads: about a quarter of fp32 per client (plus per-tensor scales and framing)
    assert 2 * job["fp32_bytes"] * 0.2 < r["bytes_up"] < 2 * job["fp32_bytes"] * 0.35
    # P2U 4+4+8 bits: cumulative stage bytes grow to about half of fp32
    s = r["p2u_stage_bytes"]
    assert len(s) == 3 and s[0] < s[1] < s[2] < 0.6 * job["fp32_bytes"]
    assert r["train_loss"] > 0
    # the shard's and the workers' processes were found and measured; the driver's peak is read
    assert job["shard_pids"] == 1 and job["shard_peak_rss"] > 50 << 20
    assert job["worker_pids"] >= 1 and job["worker_peak_rss"] > 50 << 20
    assert job["driver_peak_rss"] >= job["driver_rss_at_start"] > 0


def test_p2u_first_usable_model_beats_fp32_send():
    bm = _bench()
    out = bm.p2u_time(bm.LMTask(**bm.TINY, seed=1), bandwidths_mbit=(10,))
    assert out["stage_bytes"][0] < out["fp32_bytes"] / 6  # 4 bits + a float32 min and step per block
    assert out["max_abs_error_all_stages"] < out["max_abs_error_stage0"]
    (row,) = out["time_to_first_usable"]
    assert row["p2u_first_usable_s"] < row["fp32_one_shot_s"]
