"""Model kinds, the sequence data set loader, and train_local's FedProx and pruning-mask options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedray.compression.fd import magnitude_mask
from fedray.workers.data import load_dataset
from fedray.workers.models import build_model, get_params, layout_of
from fedray.workers.train import TrainConfig, train_local


@pytest.mark.parametrize("kind,shape,hidden,n_params", [
    ("mlp", (28, 28), (200, 200), 784 * 200 + 200 + 200 * 200 + 200 + 2010),
    ("cnn", (28, 28), (8, 16, 32), 8 * 25 + 8 + 16 * 8 * 25 + 16 + 16 * 49 * 32 + 32 + 330),
    ("cnn", (1, 28, 28), (8, 16, 32), 8 * 25 + 8 + 16 * 8 * 25 + 16 + 16 * 49 * 32 + 32 + 330),
    ("conv1d", (29, 12), (32, 16), 12 * 32 * 3 + 32 + 32 * 16 * 3 + 16 + 170),
    ("gru", (29, 12), (16,), 3 * 16 * 12 + 3 * 16 * 16 + 6 * 16 + 170),
])
def test_kinds_forward_and_sizes(kind, shape, hidden, n_params):
    model = build_model(kind, shape, 10, hidden)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert layout_of(model).shapes == tuple((k, tuple(v.shape)) for k, v in get_params(model).items())


def test_mlp_names_unchanged_and_errors():
    assert list(get_params(build_model("mlp", (8, 8), 10, (16, 16)))) == [
        "1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("transformer", (8,), 2, (4,))
    with pytest.raises(ValueError, match="cnn"):
        build_model("cnn", (28, 28), 10, (8, 16))
    with pytest.raises(ValueError, match="layout_of"):
        layout_of(torch.nn.Linear(2, 2))


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((3, 16))[y] + rng.standard_normal((n, 16))).astype(np.float32).reshape(n, 4, 4)
    return x, y


def test_train_local_prox_pulls_toward_start_and_mask_holds():
    x, y = _data()
    torch.manual_seed(0)
    base = build_model("mlp", (4, 4), 3, (16,))
    start = get_params(base)
    dist = {}
    for mu in (0.0, 10.0):
        m = build_model("mlp", (4, 4), 3, (16,))
        m.load_state_dict(start)
        train_local(m, x, y, 1.0, 0.0, TrainConfig(lr=0.1, local_epochs=2, batch_size=32), seed=1, prox_mu=mu)
        dist[mu] = sum(float((v - start[k]).norm() ** 2) for k, v in get_params(m).items())
    assert dist[10.0] < dist[0.0]
    mask = magnitude_mask(start, 0.6)
    m = build_model("mlp", (4, 4), 3, (16,))
    m.load_state_dict(start)
    train_local(m, x, y, 1.0, 0.0, TrainConfig(lr=0.1, momentum=0.9, local_epochs=1, batch_size=32), seed=1, mask=mask)
    for k, keep in mask.items():
        assert bool((get_params(m)[k][~keep] == 0).all())
    with pytest.raises(ValueError, match="prox_mu"):
        train_local(m, x, y, 1.0, 0.0, TrainConfig(local_epochs=1, batch_size=32, lr=0.1), seed=1, prox_mu=-1.0)


def test_japanese_vowels_loader():
    d = load_dataset("japanese-vowels")  # sktime is a dependency: its .ts files must be found
    assert d.x_train.shape == (270, 29, 12) and d.x_test.shape == (370, 29, 12)
    assert d.num_classes == 9 and np.bincount(d.y_train).tolist() == [30] * 9
    assert d.x_train.dtype == np.float32 and abs(float(d.x_train[:, -1].mean())) < 0.5
    assert bool((d.x_train[:, 0] == 0).any())  # short utterances are left-padded with zeros


def test_device_choice_follows_ray_gpu_assignment():
    import torch

    from fedray.orchestrator.spec import ResourceSpec, SpecError
    from fedray.workers.train import pick_device

    # No GPU was assigned to this process (and none is visible): auto trains on the CPU.
    assert pick_device("auto") == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        pick_device("tpu")
    with pytest.raises(SpecError, match="resources.device"):
        ResourceSpec(device="cuda")
    assert ResourceSpec(device="cuda", gpus_per_worker=1).device == "cuda"


def test_train_local_runs_where_the_model_is():
    import torch

    from fedray.workers.models import build_model
    from fedray.workers.train import TrainConfig, train_local

    m = build_model("mlp", (8, 8), 10, (16,))
    x = np.random.default_rng(0).integers(0, 16, (20, 8, 8)).astype(np.uint8)
    y = np.arange(20) % 10
    st = train_local(m, x, y, 1 / 16, 0.0, TrainConfig(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0), seed=1)
    assert st.steps == 3 and next(m.parameters()).device == torch.device("cpu")
