"""The conv kernels (workers/conv_kernels.py) give the plain path's results: oneDNN evaluation,
channels_last training through the client step; they apply only to the models they handle, and a
oneDNN forward that fails falls back to the plain path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedray.builtin_tasks import ClassificationTask
from fedray.compression import decode_checked, get_codec
from fedray.workers.broadcast import make_broadcast
from fedray.workers.client import TrainerSetup
from fedray.workers.conv_kernels import fast_eval_model, supports_conv_kernels
from fedray.workers.models import build_model, get_params
from fedray.workers.step import ClientStep
from fedray.workers.train import TrainConfig, evaluate

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture(scope="module")
def task():
    return ClassificationTask(dataset="digits", model="cnn", hidden=(8, 16, 32), num_clients=20)


@needs_onednn
def test_fast_evaluation_equals_the_plain_path(task, monkeypatch):
    torch.manual_seed(0)
    model = task.model()
    test = task.test_data()
    assert fast_eval_model(model) is not None  # the fast path is the one measured below
    fast = evaluate(model, test.x, test.y, test.scale, test.shift)
    monkeypatch.setenv("FEDRAY_CONV_KERNELS", "none")
    assert fast_eval_model(model) is None
    plain = evaluate(model, test.x, test.y, test.scale, test.shift)
    assert fast[0] == plain[0] and 0.0 < plain[1]
    assert fast[1] == pytest.approx(plain[1], rel=1e-5)


def test_only_the_models_it_handles():
    assert supports_conv_kernels(build_model("cnn", (8, 8), 10, (8, 16, 32)))
    assert supports_conv_kernels(build_model("cnn", (1, 8, 8), 10, (8, 16, 32)))
    assert not supports_conv_kernels(build_model("mlp", (8, 8), 10, (64,)))  # no convolution
    assert not supports_conv_kernels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2)))
    assert not supports_conv_kernels(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten()))
    assert not supports_conv_kernels(nn.Sequential(nn.Conv2d(1, 4, 3).double(), nn.Flatten()))

    class Net(nn.Module):  # a forward of its own: may do anything to the activations
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.c(x).view(len(x), -1)

    class MyConv(nn.Conv2d):
        pass

    assert not supports_conv_kernels(Net())
    assert not supports_conv_kernels(nn.Sequential(MyConv(1, 4, 3), nn.Flatten()))
    assert fast_eval_model(Net()) is None


@needs_onednn
def test_a_failing_onednn_forward_falls_back_to_the_plain_path(task):
    torch.manual_seed(0)
    # oneDNN's max pooling refuses dilation: the fast forward raises, evaluate still answers
    model = nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2, dilation=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 10))
    fast = fast_eval_model(model)
    test = task.test_data()
    x = torch.from_numpy(test.x[:4]).float()
    with pytest.raises(RuntimeError):
        fast(x)
    acc, loss = evaluate(model, test.x, test.y, test.scale, test.shift)
    with torch.no_grad():
        logits = model(torch.from_numpy(test.x).float() * test.scale + test.shift)
    assert acc == pytest.approx(float((logits.argmax(1) == torch.from_numpy(test.y).long()).double().mean()), abs=1e-12)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, torch.from_numpy(test.y).long())), rel=1e-5)


def _setup(codec: str) -> TrainerSetup:
    return TrainerSetup(job_id="j", secret="s", seed=5, train=TrainConfig(local_epochs=2, batch_size=10, lr=0.05),
                        codec=codec)


@pytest.mark.parametrize("codec", ["identity", "int8"])
def test_channels_last_training_gives_the_plain_update(task, monkeypatch, codec):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        start = get_params(task.model())
    bcast = make_broadcast(start, codec="identity", codec_params={}, round=1)
    step = ClientStep(_setup(codec), task, torch.device("cpu"))
    conv = step.model[4]  # Unflatten, Conv2d, ReLU, MaxPool2d, Conv2d
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    monkeypatch.setenv("FEDRAY_CONV_KERNELS", "none")
    plain_step = ClientStep(_setup(codec), task, torch.device("cpu"))
    assert plain_step.model[4].weight.is_contiguous()
    c = get_codec(codec)
    for cid in (0, 7):
        got = {k: decode_checked(c, p) for k, p in step.run(1, start, cid, bcast).tensors}
        want = {k: decode_checked(c, p) for k, p in plain_step.run(1, start, cid, bcast).tensors}
        assert got.keys() == want.keys() == start.keys()
        for k in start:
            assert got[k].shape == start[k].shape
            # int8: a rounding difference may move a code by one step (absmax / 127)
            tol = 1e-5 if codec == "identity" else 1e-5 + float(want[k].abs().max()) / 127
            torch.testing.assert_close(got[k], want[k], atol=tol, rtol=0)
        assert any(float(v.abs().max()) > 0 for v in got.values())  # it trained


@needs_onednn
def test_evaluation_threads_give_the_one_thread_result(task):
    torch.manual_seed(0)
    model = task.model()
    test = task.test_data()
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = evaluate(model, test.x, test.y, test.scale, test.shift, batch=64)
        torch.set_num_threads(3)  # three threads over 6 batches of 64 (360 test images)
        three = evaluate(model, test.x, test.y, test.scale, test.shift, batch=64)
        assert torch.get_num_threads() == 3  # restored after the batches ran on one intra-op thread each
    finally:
        torch.set_num_threads(prev)
    assert one == three  # per-batch sums added in batch order: the same floats
