"""A user's own task, outside the fedray package: a small CNN with BatchNorm on Fashion-MNIST.

BatchNorm keeps running statistics (buffers), so fedray trains these clients one by one (the
batched path needs buffer-free models); the buffers are federated like any other tensor.

    fedray run examples/custom_cnn/job.yaml
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fedray

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class Images(torch.utils.data.Dataset):
    """(1x28x28 float image in [0, 1], label) pairs."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i].astype(np.float32) / 255.0).unsqueeze(0), int(self.y[i])


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class FashionCNN(fedray.Task):
    """Each client holds `per_client` training images (a seeded shuffle split)."""

    def __init__(self, num_clients: int = 100, per_client: int = 60, width: int = 8, test_size: int = 2000,
                 data_dir: str = str(FASHION_MNIST), seed: int = 0) -> None:
        self.n, self.per_client, self.width, self.test_size = num_clients, per_client, width, test_size
        self.data_dir, self.seed = Path(data_dir), seed
        self._train = None

    def _load(self):
        if self._train is None:
            x = read_idx(self.data_dir / "train-images-idx3-ubyte.gz")
            y = read_idx(self.data_dir / "train-labels-idx1-ubyte.gz")
            order = np.random.default_rng(self.seed).permutation(len(y))[: self.n * self.per_client]
            self._train = (x[order], y[order])
        return self._train

    def model(self) -> nn.Module:
        return SmallCNN(self.width)

    def num_clients(self) -> int:
        return self.n

    def client_data(self, client_id: int) -> torch.utils.data.Dataset:
        x, y = self._load()
        s = slice(client_id * self.per_client, (client_id + 1) * self.per_client)
        return Images(x[s], y[s])

    def test_data(self) -> torch.utils.data.Dataset:
        x = read_idx(self.data_dir / "t10k-images-idx3-ubyte.gz")[: self.test_size]
        y = read_idx(self.data_dir / "t10k-labels-idx1-ubyte.gz")[: self.test_size]
        return Images(x, y)
