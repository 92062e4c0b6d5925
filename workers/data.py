"""Data sets and partitioners. Nothing downloads: data comes from packages on this machine.

Images stay uint8 in memory (47 MB for Fashion-MNIST's training set) and are scaled per batch.
Partitions are stored compactly as CSR (`offsets`, `indices`), not one object per client, so
that a population of millions of clients costs a few arrays.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data

__all__ = [
    "ArrayDataset",
    "DEBIAN_FASHION_MNIST",
    "DatasetMissingError",
    "Dataset",
    "Partition",
    "as_arrays",
    "load_dataset",
    "load_japanese_vowels",
    "partition",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetMissingError(FileNotFoundError):
    """The data set's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class Dataset:
    """A classification data set: uint8 (or float) features and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float  # features become x * scale + shift (standardized to mean 0, std 1)
    shift: float = 0.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


class ArrayDataset(torch.utils.data.Dataset):
    """A map-style torch Dataset over in-memory arrays: item i is (x[i] * scale + shift as
    float32, y[i]); `scale=None` leaves x as stored (e.g. int64 token ids for an embedding).

    Training and evaluation read `x`, `y`, `scale`, `shift` directly (`as_arrays`), so the
    uint8 images of the built-in data sets are scaled per batch, never stored as float32.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, scale: float | None = None, shift: float = 0.0) -> None:
        if len(x) != len(y):
            raise ValueError(f"ArrayDataset: {len(x)} inputs but {len(y)} targets")
        self.x, self.y, self.scale, self.shift = x, y, scale, shift

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = np.asarray(self.x[i])
        if self.scale is not None:
            x = x.astype(np.float32) * np.float32(self.scale) + np.float32(self.shift)
        return torch.as_tensor(x), torch.as_tensor(self.y[i])


def as_arrays(data) -> tuple[np.ndarray, np.ndarray, float | None, float]:
    """(x, y, scale, shift) of a map-style Dataset of (input, target) pairs: an `ArrayDataset`'s
    own arrays, a `TensorDataset`'s tensors, else every item stacked (client data sets are small).

    Raises:
        ValueError: an item is not an (input, target) pair, or the items do not stack.
    """
    if isinstance(data, ArrayDataset):
        return data.x, data.y, data.scale, data.shift
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
        return x.detach().cpu().numpy(), y.detach().cpu().numpy(), None, 0.0
    n = len(data)
    xs, ys = [], []
    for i in range(n):
        item = data[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"item {i} of the client's data set is a {type(item).__name__}, not an (input, target) pair")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64), None, 0.0
    try:
        return torch.stack(xs).numpy(), torch.stack(ys).numpy(), None, 0.0
    except RuntimeError as e:
        raise ValueError(f"the client's examples do not stack into one batch ({e}); override Task.train") from None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX type 0x{raw[2]:02x} is not unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetMissingError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        f"'apt-get install dataset-fashion-mnist' (files land in {DEBIAN_FASHION_MNIST}), "
        f"or pass --data-dir DIR holding the four IDX files."
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    root = Path(data_dir) if data_dir else DEBIAN_FASHION_MNIST
    parts = [_read_idx(_find_idx(root, f)) for f in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
    )]
    xtr, ytr, xte, yte = parts
    # Fashion-MNIST pixel mean 72.94 and std 90.02 (of 0-255): standardize, SGD converges faster.
    return Dataset("fashion-mnist", xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), 10, 1 / 90.02, -72.94 / 90.02)


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """sklearn's bundled digits (1,797 8x8 images, values 0-16), split by a seeded shuffle."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise DatasetMissingError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = _load()
    x = d.images.astype(np.uint8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    # digits pixel mean 4.88 and std 6.02 (of 0-16).
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, 1 / 6.02, -4.88 / 6.02)


JAPANESE_VOWELS_FRAMES = 29
JAPANESE_VOWELS_FEATURES = 12
_TS_PACKAGES = ("sktime", "aeon")


def _find_ts(data_dir: str | os.PathLike | None) -> Path:
    import importlib.util

    roots = [Path(data_dir)] if data_dir else []
    for pkg in _TS_PACKAGES:
        # find_spec locates the installed package without importing it (importing sktime costs
        # seconds and pulls pandas).
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) / "datasets" / "data" / "JapaneseVowels" for p in spec.submodule_search_locations]
    for root in roots:
        if (root / "JapaneseVowels_TRAIN.ts").is_file() and (root / "JapaneseVowels_TEST.ts").is_file():
            return root
    raise DatasetMissingError(
        "JapaneseVowels_{TRAIN,TEST}.ts not found: they ship inside the sktime and aeon wheels; "
        "run 'pip install sktime' (or 'pip install aeon'), or pass --data-dir DIR holding the two files."
    )


def _read_ts(path: Path, frames: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A multivariate .ts file (dims separated by ':', label last) as (N, frames, dims) float32,
    left zero-padded or truncated to `frames`, with string labels."""
    xs, labels = [], []
    in_data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        series = np.array([[float(v) for v in d.split(",")] for d in dims], dtype=np.float32).T  # (T, dims)
        xs.append(series[-frames:])
        labels.append(label)
    out = np.zeros((len(xs), frames, xs[0].shape[1]), dtype=np.float32)
    for i, s in enumerate(xs):
        out[i, frames - len(s):] = s  # left padding: a recurrent model's last step sees real data
    return out, np.array(labels), sorted(set(labels), key=lambda v: (len(v), v))


def load_japanese_vowels(data_dir: str | os.PathLike | None = None) -> Dataset:
    """UCI Japanese Vowels (9 speakers, 270 train / 370 test utterances of /ae/, 12 LPC cepstrum
    coefficients per frame, 7-29 frames), from the .ts files bundled in the sktime or aeon wheel.

    Features are (29, 12) float32, left zero-padded, standardized per coefficient with the
    training set's statistics (so `scale` 1 and `shift` 0). The label is the speaker (0-8).

    Raises:
        DatasetMissingError: neither package (nor `data_dir`) holds the files.
    """
    root = _find_ts(data_dir)
    xtr, ltr, classes = _read_ts(root / "JapaneseVowels_TRAIN.ts", JAPANESE_VOWELS_FRAMES)
    xte, lte, _ = _read_ts(root / "JapaneseVowels_TEST.ts", JAPANESE_VOWELS_FRAMES)
    real = np.abs(xtr).sum(axis=2) > 0
    mu, sd = xtr[real].mean(axis=0), xtr[real].std(axis=0) + 1e-6
    for x in (xtr, xte):
        pad = np.abs(x).sum(axis=2, keepdims=True) == 0
        x -= mu
        x /= sd
        x[np.broadcast_to(pad, x.shape)] = 0.0
    index = {c: i for i, c in enumerate(classes)}
    ytr = np.array([index[v] for v in ltr], dtype=np.int64)
    yte = np.array([index[v] for v in lte], dtype=np.int64)
    return Dataset("japanese-vowels", xtr, ytr, xte, yte, len(classes), 1.0, 0.0)


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Load a built-in data set by name (`fedray.builtin_tasks.load_builtin_dataset`).

    Raises:
        DatasetMissingError: its files are not on this machine (the message says how to get them).
        ValueError: unknown name.
    """
    from fedray.builtin_tasks import load_builtin_dataset

    return load_builtin_dataset(name, data_dir, seed)


@dataclass(frozen=True)
class Partition:
    """Client k holds examples `indices[offsets[k]:offsets[k+1]]` of the training set."""

    offsets: np.ndarray  # int64, num_clients + 1
    indices: np.ndarray  # int32 or int64

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def client(self, k: int) -> np.ndarray:
        return self.indices[self.offsets[k] : self.offsets[k + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def partition(labels: np.ndarray, num_clients: int, *, method: str = "iid", alpha: float = 0.5, seed: int = 0) -> Partition:
    """Split example indices among `num_clients` clients, seeded.

    `iid`: a shuffled equal split. `dirichlet`: per class, proportions drawn from Dir(alpha) over
    clients (smaller alpha, more skew); every client is guaranteed at least one example.
    When there are fewer examples than clients, examples are reused (with replacement).
    """
    rng = np.random.default_rng([seed, 0xDA7A])
    n = len(labels)
    if method == "iid":
        # Spacing >= 1 between bounds, so every client gets at least one example.
        order = rng.permutation(n) if n >= num_clients else rng.integers(0, n, num_clients)
        bounds = np.linspace(0, len(order), num_clients + 1).round().astype(np.int64)
        return Partition(bounds, order.astype(np.int64))
    if method != "dirichlet":
        raise ValueError(f"unknown partition method {method!r}; choose iid or dirichlet")
    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(num_clients, alpha))
        # Client of each example of class c: cut the shuffled class at the cumulative proportions.
        owner[idx] = np.minimum(np.searchsorted(np.cumsum(p), (np.arange(len(idx)) + 0.5) / len(idx)), num_clients - 1)
    # Clients left empty borrow one random example each, so every client can train.
    counts = np.bincount(owner, minlength=num_clients)
    empty = np.flatnonzero(counts == 0)
    order = np.argsort(owner, kind="stable")
    extra_idx = rng.integers(0, n, len(empty))
    all_owner = np.concatenate([owner[order], empty])
    all_idx = np.concatenate([order, extra_idx])
    final = np.argsort(all_owner, kind="stable")
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(np.bincount(all_owner, minlength=num_clients), out=offsets[1:])
    return Partition(offsets, all_idx[final].astype(np.int64))
