import numpy as np
import pytest

from fedray.workers.data import DatasetMissingError, load_dataset, load_fashion_mnist, partition


def _check_cover(p, n):
    assert p.offsets[0] == 0 and p.offsets[-1] == len(p.indices)
    assert (p.sizes() >= 1).all()
    assert p.indices.min() >= 0 and p.indices.max() < n


def test_iid_partition_is_a_seeded_permutation():
    labels = np.repeat(np.arange(10), 100)
    a = partition(labels, 37, method="iid", seed=3)
    b = partition(labels, 37, method="iid", seed=3)
    _check_cover(a, len(labels))
    assert np.array_equal(a.indices, b.indices)
    assert sorted(a.indices.tolist()) == list(range(len(labels)))
    assert a.sizes().max() - a.sizes().min() <= 1
    assert not np.array_equal(a.indices, partition(labels, 37, method="iid", seed=4).indices)


def test_dirichlet_skews_with_small_alpha():
    labels = np.repeat(np.arange(10), 500)
    skewed = partition(labels, 50, method="dirichlet", alpha=0.1, seed=0)
    flat = partition(labels, 50, method="dirichlet", alpha=100.0, seed=0)
    _check_cover(skewed, len(labels))

    def mean_classes(p):
        return np.mean([len(np.unique(labels[p.client(k)])) for k in range(p.num_clients)])

    assert mean_classes(skewed) < mean_classes(flat) - 3


def test_more_clients_than_examples_still_gives_everyone_data():
    labels = np.arange(10) % 3
    for m in ("iid", "dirichlet"):
        _check_cover(partition(labels, 25, method=m, seed=1), 10)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_digits_loads_with_a_seeded_split():
    a, b = load_dataset("digits", seed=5), load_dataset("digits", seed=5)
    assert a.x_train.shape[1:] == (8, 8) and len(a.y_train) + len(a.y_test) == 1797
    assert np.array_equal(a.y_test, b.y_test)


def test_fashion_mnist_idx_files_load():
    d = load_dataset("fashion-mnist")
    assert d.x_train.shape == (60000, 28, 28) and d.x_test.shape == (10000, 28, 28)
    assert d.x_train.dtype == np.uint8 and set(np.unique(d.y_test)) == set(range(10))
