"""Population: derived device profiles, online clients, O(cohort) sampling, over-selection, deadline,
virtual time, memory."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedray.orchestrator.population import (
    DeviceProfileSpec, Population, PopulationError, SeededPartition, completion_times, permute,
)
from fedray.orchestrator.spec import SpecError


def test_same_seed_same_rounds_and_other_seed_differs():
    spec = DeviceProfileSpec(availability=0.7, availability_concentration=5.0)
    a, b, c = Population(5000, 1, profile=spec), Population(5000, 1, profile=spec), Population(5000, 2, profile=spec)
    for r in (1, 2, 7):
        sa, sb = a.sample_round(r, 50, bytes_up=1e4), b.sample_round(r, 50, bytes_up=1e4)
        np.testing.assert_array_equal(sa.train_ids, sb.train_ids)
        assert sa.virtual_s == sb.virtual_s
    assert not np.array_equal(a.sample_round(1, 50).train_ids, c.sample_round(1, 50).train_ids)
    assert not np.array_equal(a.sample_round(1, 50).train_ids, a.sample_round(2, 50).train_ids)


def test_over_selection_keeps_exactly_k_fastest():
    pop = Population(2000, 3, profile=DeviceProfileSpec(seconds_per_example=0.01))
    ex = np.random.default_rng(0).integers(1, 100, 2000)
    s = pop.sample_round(4, 100, over_select=1.5, bytes_up=50_000, bytes_down=80_000, examples=ex, epochs=2)
    assert s.selected == 150 and len(s.train_ids) == 100 and len(set(s.train_ids.tolist())) == 100
    # Recompute every candidate's time independently: the kept ones are the 100 smallest.
    cand, online = pop.candidates(4, 150)
    assert online == 2000 and len(set(cand.tolist())) == 150
    speed, up, down, _ = pop.profiles(cand)
    t = 2 * ex[cand] * 0.01 / speed + 80_000 * 8 / (down * 1e6) + 50_000 * 8 / (up * 1e6)
    np.testing.assert_array_equal(np.sort(s.train_ids), np.sort(cand[np.argsort(t)[:100]]))
    assert np.all(np.diff(s.finish_s) >= 0)
    assert s.virtual_s == pytest.approx(np.sort(t)[99], rel=1e-6)  # the test computes in float32
    assert s.finish_s.max() <= np.sort(t)[100]  # nobody kept finishes after a dropped one


def test_deadline_drops_slow_clients_and_round_waits_for_it():
    pop = Population(1000, 5, profile=DeviceProfileSpec(speed_sigma=1.0))
    free = pop.sample_round(1, 200, over_select=1.3, bytes_up=1e5)
    deadline = float(np.median(free.finish_s))
    s = pop.sample_round(1, 200, over_select=1.3, bytes_up=1e5, deadline_s=deadline)
    assert 0 < len(s.train_ids) < 200
    assert np.all(s.finish_s <= deadline)
    assert s.missed_deadline > 0
    assert s.virtual_s == deadline  # fewer than k made it: the server waited until the deadline
    # A generous deadline changes nothing.
    loose = pop.sample_round(1, 200, over_select=1.3, bytes_up=1e5, deadline_s=1e9)
    np.testing.assert_array_equal(loose.train_ids, free.train_ids)
    assert loose.virtual_s == free.virtual_s


def test_bandwidth_and_bytes_drive_completion_time():
    t = completion_times(np.array([10, 10]), np.array([1.0, 2.0], np.float32), np.array([1.0, 1.0], np.float32),
                         np.array([8.0, 8.0], np.float32), epochs=3, seconds_per_example=0.5,
                         bytes_up=125_000, bytes_down=1_000_000)
    # compute 3*10*0.5/speed, download 8 Mbit over 8 Mbit/s, upload 1 Mbit over 1 Mbit/s.
    np.testing.assert_allclose(t, [15 + 1 + 1, 7.5 + 1 + 1])


def test_offline_clients_never_selected(tmp_path):
    trace = tmp_path / "devices.csv"
    rows = ["client_id,speed,up_mbps,down_mbps,availability"]
    rows += [f"{i},1.0,10,50,{0.0 if i % 2 else 1.0}" for i in range(10)]
    trace.write_text("\n".join(rows) + "\n")
    pop = Population(1000, 0, profile=DeviceProfileSpec(trace_file=str(trace)))
    speed = pop.profiles(np.arange(1000))[0]
    assert speed.dtype == np.float32 and len(speed) == 1000 and pop.memory_bytes() < 1000
    for r in range(1, 6):
        s = pop.sample_round(r, 100, over_select=2.0)
        assert s.online == 500
        assert np.all(s.train_ids % 2 == 0)  # odd rows of the trace are never online
    # Seeded availability: every selected client is among that round's online clients.
    pop2 = Population(3000, 9, profile=DeviceProfileSpec(availability=0.3, availability_concentration=2.0))
    s = pop2.sample_round(2, 100)
    assert set(s.train_ids.tolist()) <= set(pop2.online(2).tolist())
    assert 0.2 * 3000 < s.online < 0.4 * 3000


def test_fewer_online_than_requested():
    trace_pop = Population(50, 0, profile=DeviceProfileSpec(availability=0.2))
    s = trace_pop.sample_round(1, 40, over_select=1.3)
    assert len(s.train_ids) == s.selected == s.online < 40


def test_bad_arguments_raise():
    with pytest.raises(SpecError, match=r"population\.availability: must be in \(0, 1\]"):
        DeviceProfileSpec(availability=0.0)
    with pytest.raises(SpecError, match=r"population\.speed_median: must be > 0"):
        DeviceProfileSpec(speed_median=-1)
    pop = Population(10, 0)
    with pytest.raises(PopulationError):
        pop.sample_round(1, 0)
    with pytest.raises(PopulationError):
        pop.sample_round(1, 5, over_select=0.5)
    with pytest.raises(PopulationError):
        pop.sample_round(1, 5, deadline_s=0)
    with pytest.raises(PopulationError):
        Population(0, 0)


def test_billion_clients_store_nothing_per_client():
    n = 1_000_000_000
    parts = SeededPartition(1437, n, examples_per_client=(8, 32), seed=0)
    pop = Population(n, 0, profile=DeviceProfileSpec(availability=0.8, availability_concentration=4.0),
                     examples=parts.sizes_of)
    assert pop.memory_bytes() == 0 and parts.memory_bytes() < 20_000 and parts.num_clients == n
    s = pop.sample_round(1, 10_000, over_select=1.3, bytes_up=20_000, bytes_down=70_000)
    assert len(s.train_ids) == 10_000 and s.selected == math.ceil(10_000 * 1.3)
    assert len(np.unique(s.train_ids)) == 10_000 and 0 <= s.train_ids.min() and s.train_ids.max() < n
    assert s.online == 800_000_000  # the expectation: nobody counts a billion clients
    assert pop.is_online(1, s.train_ids).all()
    # The last clients are as reachable as the first: ids spread over the whole range.
    assert np.histogram(s.train_ids, bins=4, range=(0, n))[0].min() > 2000
    np.testing.assert_array_equal(s.train_ids, pop.sample_round(1, 10_000, over_select=1.3, bytes_up=20_000,
                                                                 bytes_down=70_000).train_ids)
    k = int(s.train_ids[0])
    idx = parts.client(k)
    assert len(idx) == parts.sizes_of(np.array([k]))[0] and 8 <= len(idx) <= 32


def test_permute_is_a_bijection_and_uniform():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        ids = permute(np.arange(n, dtype=np.uint64), n, key=12345)
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))
    # Over many keys, the first position lands on every id about equally often.
    first = np.array([permute(np.zeros(1, np.uint64), 10, key=k)[0] for k in range(3000)])
    counts = np.bincount(first, minlength=10)
    assert counts.min() > 220 and counts.max() < 380  # 300 expected each
    assert not np.array_equal(permute(np.arange(50, dtype=np.uint64), 1000, 1),
                              permute(np.arange(50, dtype=np.uint64), 1000, 2))


def test_derived_profiles_follow_their_distributions():
    spec = DeviceProfileSpec(speed_median=2.0, speed_sigma=0.5, up_mbps_median=10.0, availability=0.3,
                             availability_concentration=2.0)
    pop = Population(10**9, 7, profile=spec)
    ids = np.arange(0, 10**9, 10**9 // 100_000, dtype=np.int64)
    speed, up, down, avail = pop.profiles(ids)
    assert abs(np.median(speed) / 2.0 - 1) < 0.02 and abs(np.median(up) / 10.0 - 1) < 0.03
    assert abs(np.log(speed).std() - 0.5) < 0.01
    assert abs(avail.mean() - 0.3) < 0.01 and avail.min() >= 0 and avail.max() <= 1
    assert abs(pop.is_online(3, ids).mean() - 0.3) < 0.01
    np.testing.assert_array_equal(speed[5:9], pop.profiles(ids[5:9])[0])  # per client, not per batch
    assert not np.array_equal(speed, Population(10**9, 8, profile=spec).profiles(ids)[0])


def test_seeded_partition_deterministic_distinct_in_range():
    p = SeededPartition(100, 10_000, examples_per_client=(1, 100), seed=4)
    q = SeededPartition(100, 10_000, examples_per_client=(1, 100), seed=4)
    for k in (0, 1, 9_999, 1234):
        idx = p.client(k)
        np.testing.assert_array_equal(idx, q.client(k))
        assert len(idx) == p.sizes()[k] == p.sizes_of(np.array([k]))[0] and len(np.unique(idx)) == len(idx)
        assert idx.min() >= 0 and idx.max() < 100
    counts = np.bincount(np.concatenate([p.client(k) for k in range(2000)]), minlength=100)
    assert counts.min() > 0.5 * counts.mean()  # every example is used, roughly evenly
    assert 45 < p.sizes().mean() < 56 and p.sizes().min() >= 1 and p.sizes().max() <= 100
    with pytest.raises(PopulationError):
        SeededPartition(10, 5, examples_per_client=11)
    with pytest.raises(IndexError):
        p.client(10_000)
