"""workers/seeds.py: the vectorized per-client seeds equal SeedSequence's exactly."""

import numpy as np
import pytest

from fedray.workers.seeds import client_seeds
from fedray.workers.step import client_seed


@pytest.mark.parametrize("job_seed,round", [(0, 1), (0, 15), (7, 3), (123456789, 100000), (2**32 - 1, 2**32 - 1)])
def test_equal_to_seed_sequence_on_many_ids(job_seed, round):
    rng = np.random.default_rng(job_seed ^ round)
    ids = np.concatenate([np.arange(300), rng.integers(0, 2**32, 300), [2**32 - 1, 2**31, 1 << 20]])
    got = client_seeds(job_seed, round, ids)
    assert got.dtype == np.uint64 and got.shape == ids.shape
    assert [int(x) for x in got] == [client_seed(job_seed, round, int(c)) for c in ids]


def test_outside_the_transcription_falls_back_to_seed_sequence():
    # a job seed of two words, ids past 2**32: more entropy words than the pool holds
    for job_seed, round, ids in [(2**40 + 5, 2, [0, 3, 2**32, 2**45]), (2**64 + 1, 2**33, [9])]:
        assert [int(x) for x in client_seeds(job_seed, round, ids)] == [client_seed(job_seed, round, c) for c in ids]


def test_empty_and_order():
    assert client_seeds(0, 1, []).shape == (0,)
    ids = [5, 1, 5, 900]
    assert [int(x) for x in client_seeds(3, 4, ids)] == [client_seed(3, 4, c) for c in ids]
