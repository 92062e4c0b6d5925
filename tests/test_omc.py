"""OMC: number formats, packing, exact wire bytes, gradients through compressed parameters,
memory held below fp32, partial quantization, training and payload round trips."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fedray.compression import CodecContext, PayloadError, decode_checked, get_codec
from fedray.compression.omc import (
    OMCConfig, OMCModel, _pack, _unpack, decode_params, dequantize, encode_params,
    fit_transform, quantizable_names, quantize, stored_form,
)
from fedray.workers.models import build_model, get_params
from fedray.workers.train import TrainConfig, evaluate, train_local


def test_config_validation():
    with pytest.raises(ValueError, match="fmt"):
        OMCConfig(fmt="posit")
    with pytest.raises(ValueError, match="bits"):
        OMCConfig(bits=17)
    with pytest.raises(ValueError, match="exp_bits"):
        OMCConfig(bits=8, fmt="float", exp_bits=7)
    with pytest.raises(ValueError, match="partial"):
        OMCConfig(partial_fp32_fraction=1.5)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(1, 300), start=st.integers(0, 50), seed=st.integers(0, 1000))
def test_pack_unpack_any_range(bits, n, start, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, n)
    buf = _pack(codes, bits)
    assert buf.nbytes == math.ceil(n * bits / 8)
    s = min(start, n - 1)
    assert _unpack(buf, bits, s, n).tolist() == codes[s:].tolist()


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_int_rtn_error_bound_and_stochastic_unbiased(bits):
    w = torch.randn(4000) * 0.3
    a, b = fit_transform(float(w.min()), float(w.max()), bits=bits)
    rtn = dequantize(quantize(w, a, b, bits=bits), a, b, bits=bits)
    assert float((rtn - w).abs().max()) <= a / 2 * 1.001
    g = torch.Generator().manual_seed(0)
    x = torch.full((20000,), float(w[0]))
    sr = dequantize(quantize(x, a, b, bits=bits, generator=g), a, b, bits=bits)
    assert abs(float(sr.mean()) - float(w[0])) < 0.05 * a and float((sr - x).abs().max()) < a * 1.001


def test_stored_form_per_variable_against_one_shared_range():
    g = torch.Generator().manual_seed(0)
    ts = {"emb": torch.rand(50, 8, generator=g) * 8 - 4, "kernel": torch.rand(16, 8, generator=g) * 0.2 - 0.1}
    per = stored_form(ts, bits=4)
    shared = stored_form(ts, bits=4, per_variable=False)
    for k, t in ts.items():
        a, _ = fit_transform(float(t.min()), float(t.max()), bits=4)
        assert per[k].shape == t.shape and float((per[k] - t).abs().max()) <= a / 2 * 1.001
        assert per[k].unique().numel() <= 16
    # one range fitted to both: the small kernel falls into the 1-2 levels nearest zero
    a, b = fit_transform(-4.0, 4.0, bits=4)
    assert float((shared["emb"] - ts["emb"]).abs().max()) <= a / 2 * 1.01
    assert shared["kernel"].unique().numel() <= 2 < per["kernel"].unique().numel()
    assert float((shared["kernel"] - ts["kernel"]).abs().mean()) > 5 * float((per["kernel"] - ts["kernel"]).abs().mean())
    assert torch.equal(stored_form(ts, bits=8)["emb"], stored_form({"emb": ts["emb"]}, bits=8, per_variable=False)["emb"])


@pytest.mark.parametrize("bits,e", [(8, 4), (8, 5), (6, 3), (16, 5)])
def test_float_format_relative_error(bits, e):
    w = torch.cat([torch.randn(2000) * 1e-3, torch.randn(2000)])
    a, b = fit_transform(float(w.min()), float(w.max()), bits=bits, fmt="float", exp_bits=e)
    codes = quantize(w, a, b, bits=bits, fmt="float", exp_bits=e)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits
    back = dequantize(codes, a, b, bits=bits, fmt="float", exp_bits=e)
    m = bits - 1 - e
    bias = 2 ** (e - 1) - 1
    sub = a * 2.0 ** (1 - bias - m)  # spacing of subnormals, absolute
    err = ((back - w) - 0).abs()
    assert bool((err <= (w - b).abs() * 2.0 ** (-m - 1) * 1.001 + sub).all())


@pytest.mark.parametrize("bits,fmt", [(8, "int"), (4, "int"), (3, "int"), (8, "float")])
def test_codec_exact_bytes_and_roundtrip(bits, fmt):
    codec = get_codec("omc", bits=bits, fmt=fmt, exp_bits=4)
    x = torch.randn(37, 11)
    p = codec.encode(x, CodecContext(seed=1, key="w"))
    assert p.nbytes == 8 + math.ceil(37 * 11 * bits / 8) == codec.wire_bytes((37, 11))
    y = decode_checked(codec, p)
    a = (float(x.max()) - float(x.min())) / (2**bits - 1)
    if fmt == "int":
        assert float((y - x).abs().max()) <= a / 2 * 1.01
    bad = type(p)(p.codec, p.version, p.dtype, p.shape, p.params, bytes(p.nbytes - 1))
    with pytest.raises(PayloadError):
        codec.decode(bad)


MODELS = [("mlp", (8, 8), (40, 30)), ("cnn", (8, 8), (4, 6, 12)), ("conv1d", (9, 5), (8, 8))]


@pytest.mark.parametrize("kind,shape,hidden", MODELS)
@pytest.mark.parametrize("bits", [8, 16])
def test_gradients_equal_fp32_within_quantization_error(kind, shape, hidden, bits):
    torch.manual_seed(0)
    model = build_model(kind, shape, 5, hidden)
    om = OMCModel(copy.deepcopy(model), OMCConfig(bits=bits, block_bytes=256), seed=0)
    ref = copy.deepcopy(model)
    ref.load_state_dict(om.dequantized())  # fp32 model holding exactly the stored values
    x, y = torch.randn(12, *shape), torch.randint(0, 5, (12,))
    torch.nn.functional.cross_entropy(om.model(x), y).backward()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    fp32 = dict(om.model.named_parameters())
    for n, p in ref.named_parameters():
        g = om.q[n].grad if n in om.q else fp32[n].grad
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    if bits < 16:
        return
    # ...and against the original fp32 model, within the 16-bit quantization error
    plain = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(plain(x), y).backward()
    for n, p in plain.named_parameters():
        g = om.q[n].grad if n in om.q else fp32[n].grad
        assert float((g - p.grad).norm()) <= 1e-3 * float(p.grad.norm()) + 1e-6


def test_memory_held_below_fp32_and_exact_accounting():
    torch.manual_seed(0)
    model = build_model("mlp", (28, 28), 10, (64, 64))
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    om = OMCModel(model, OMCConfig(bits=8, block_bytes=4096), seed=0)
    x, y = torch.randn(32, 28, 28), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(om.model(x), y).backward()
    om.step(0.1)
    weights = [784 * 64, 64 * 64, 64 * 10]
    biases = 64 + 64 + 10
    assert om.stored_bytes() == sum(n + 8 for n in weights) + 4 * biases
    assert 0 < om.peak_transient_bytes() <= 4096 + 4 * 784  # one block, rounded up to a row
    assert om.param_memory_bytes() < 0.41 * fp32_bytes
    # the fp32 weights are really gone from the model while it trains
    assert all(p.numel() <= 64 for n, p in om.model.named_parameters())
    payloads = om.to_payloads()
    assert sum(p.nbytes for p in payloads.values()) == om.stored_bytes()
    assert list(payloads) == list(get_params(build_model("mlp", (28, 28), 10, (64, 64))))


def test_partial_quantization_is_seeded_per_client_round():
    model = build_model("mlp", (8, 8), 4, (32, 32, 32))
    cfg = OMCConfig(partial_fp32_fraction=0.5)
    picks = {frozenset(OMCModel(copy.deepcopy(model), cfg, seed=s).fp32_names) for s in range(12)}
    assert len(picks) > 1
    a = OMCModel(copy.deepcopy(model), cfg, seed=3)
    assert a.fp32_names == OMCModel(copy.deepcopy(model), cfg, seed=3).fp32_names
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert sum(sizes[n] for n in a.fp32_names) <= 0.5 * sum(sizes[n] for n in quantizable_names(model))
    assert set(a.q).isdisjoint(a.fp32_names)


def test_weights_only_false_quantizes_biases_and_global_range():
    model = build_model("mlp", (8, 8), 4, (16,))
    om = OMCModel(model, OMCConfig(bits=8, weights_only=False, per_variable=False), seed=0)
    assert set(om.q) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert len({(q.alpha, q.beta) for q in om.q.values()}) == 1
    x, y = torch.randn(6, 8, 8), torch.randint(0, 4, (6,))
    torch.nn.functional.cross_entropy(om.model(x), y).backward()
    assert om.q["1.bias"].grad is not None
    om.step(0.1)
    assert len({(q.alpha, q.beta) for q in om.q.values()}) == 1


def _blobs(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centers = rng.standard_normal((4, 64)) * 1.5
    x = (centers[y] + rng.standard_normal((n, 64))).astype(np.float32).reshape(n, 8, 8)
    return x, y


def test_train_local_omc_learns_and_reports_memory():
    x, y = _blobs()
    torch.manual_seed(0)
    model = build_model("mlp", (8, 8), 4, (32,))
    stats = train_local(model, x, y, 1.0, 0.0, TrainConfig(lr=0.05, batch_size=32, local_epochs=1), seed=1,
                        omc=OMCConfig(bits=8, block_bytes=1024))
    acc, _ = evaluate(model, x, y, 1.0)
    assert acc > 0.9 and 0 < stats.param_memory_bytes < sum(p.numel() * 4 for p in model.parameters())
    assert all(p.numel() > 0 for p in model.parameters())  # fp32 weights written back
    with pytest.raises(ValueError, match="momentum"):
        train_local(model, x, y, 1.0, 0.0, TrainConfig(momentum=0.9, local_epochs=1, batch_size=32, lr=0.1), seed=1,
                    omc=OMCConfig())


def test_broadcast_and_upload_payloads_roundtrip():
    torch.manual_seed(0)
    model = build_model("mlp", (8, 8), 4, (16,))
    params = get_params(model)
    cfg = OMCConfig(bits=6)
    down = encode_params(params, cfg, quantized=quantizable_names(model))
    assert down["1.weight"].codec == "omc" and down["1.bias"].codec == "identity"
    assert down["1.weight"].nbytes == 8 + math.ceil(16 * 64 * 6 / 8)
    client = build_model("mlp", (8, 8), 4, (16,))
    om = OMCModel(client, cfg, seed=0)
    om.load_payloads(down)
    assert np.array_equal(om.q["1.weight"].buf, np.frombuffer(down["1.weight"].data, np.uint8)[8:])
    dec = decode_params(om.to_payloads())
    srv = decode_params(down)
    assert all(torch.equal(dec[k], srv[k]) for k in params)
    assert float((srv["1.weight"] - params["1.weight"]).abs().max()) <= om.q["1.weight"].alpha / 2 * 1.01


# --- Embedding, recurrent layers, kernels --------------------------------------------------------

class _SeqNet(torch.nn.Module):
    """Embedding -> LSTM -> Linear (the Shakespeare model's shape, small)."""

    def __init__(self, rnn=torch.nn.LSTM):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6, padding_idx=0)
        self.rnn = rnn(6, 12, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(12, 20)

    def forward(self, idx):
        out, _ = self.rnn(self.embed(idx))
        return self.head(out[:, -1])


@pytest.mark.parametrize("rnn", [torch.nn.LSTM, torch.nn.GRU])
def test_embedding_and_rnn_weights_held_quantized_with_exact_gradients(rnn):
    torch.manual_seed(0)
    model = _SeqNet(rnn)
    names = quantizable_names(model)
    assert names == ["embed.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1",
                     "rnn.weight_hh_l1", "head.weight"]
    om = OMCModel(copy.deepcopy(model), OMCConfig(bits=8), seed=0)
    ref = copy.deepcopy(model)
    ref.load_state_dict(om.dequantized())
    idx, y = torch.randint(0, 20, (5, 7)), torch.randint(0, 20, (5,))
    idx[0, :3] = 0  # padding rows get no gradient
    torch.nn.functional.cross_entropy(om.model(idx), y).backward()
    torch.nn.functional.cross_entropy(ref(idx), y).backward()
    assert set(om.q) == set(names) and not any(n in dict(om.model.named_parameters()) for n in names)
    for n, p in ref.named_parameters():
        if n == "embed.weight":
            (ids, g), = om.q[n].sgrad
            dense = torch.zeros(20, 6).index_add_(0, ids, g)
            torch.testing.assert_close(dense, p.grad, rtol=1e-4, atol=1e-6)
        else:
            g = om.q[n].grad if n in om.q else dict(om.model.named_parameters())[n].grad
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    # the recurrent weights were decompressed for the whole forward/backward, and counted
    rnn_bytes = 4 * sum(om.q[n].n for n in names if n.startswith("rnn."))
    assert om.peak_transient_bytes() >= rnn_bytes
    assert all(p.numel() == 0 for p in (om.model.rnn.weight_ih_l0, om.model.rnn.weight_hh_l1))  # let go after forward
    om.step(0.1)
    om.release()
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in om.model.named_parameters()}
    torch.nn.functional.cross_entropy(om.model(idx), y).backward()  # a plain fp32 model again


def test_embedding_step_requantizes_only_the_rows_looked_up():
    torch.manual_seed(0)
    model = _SeqNet()
    om = OMCModel(model, OMCConfig(bits=8, stochastic=True), seed=3)
    q = om.q["embed.weight"]
    before = q.buf.copy().reshape(20, 6)
    idx = torch.tensor([[3, 5, 5, 9]])
    torch.nn.functional.cross_entropy(om.model(idx), torch.tensor([1])).backward()
    transform = (q.alpha, q.beta)
    om.step(1e-3)  # small: the rows stay inside the current range
    after = q.buf.reshape(20, 6)
    untouched = [r for r in range(20) if r not in (3, 5, 9)]
    assert np.array_equal(after[untouched], before[untouched]) and (q.alpha, q.beta) == transform
    # a large step leaves the range: the transform is refitted over old and new values
    torch.nn.functional.cross_entropy(om.model(idx), torch.tensor([1])).backward()
    lo, hi = q.beta, q.beta + 255 * q.alpha
    om.step(1e4)
    assert q.beta < lo or q.beta + 255 * q.alpha > hi


def test_stochastic_rounder_unbiased_and_in_range():
    from fedray.compression.omc_kernels import Rounder

    x = torch.full((200_000,), 3.3)
    codes = np.empty(x.numel(), np.uint8)
    Rounder(7).quantize_into(x.clone(), 1.0, 0.5, 255, codes)  # (3.3 - 1) / 0.5 = 4.6
    assert set(np.unique(codes).tolist()) == {4, 5} and abs(codes.mean() - 4.6) < 0.01
    Rounder(None).quantize_into(torch.tensor([-5.0, 1.24, 1.26, 500.0]), 1.0, 0.5, 255, codes[:4])
    assert codes[:4].tolist() == [0, 0, 1, 255]


def test_multihead_attention_projection_left_fp32():
    model = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    names = quantizable_names(model)
    assert "self_attn.out_proj.weight" not in names and {"linear1.weight", "linear2.weight"} <= set(names)
    om = OMCModel(model, OMCConfig(bits=8), seed=0)
    x = torch.randn(2, 5, 16)
    om.model(x).sum().backward()
    om.step(0.01)
    assert om.q["linear1.weight"].grad is None


def test_linear_on_sequences_in_several_blocks_matches_one_block():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 30), torch.nn.Linear(30, 4))
    x = torch.randn(3, 5, 8)
    outs = []
    for block in (None, 4 * 8 * 7):  # whole layers, then blocks of 7 rows
        om = OMCModel(copy.deepcopy(lin), OMCConfig(bits=8, block_bytes=block), seed=0)
        xx = x.clone().requires_grad_(True)
        y = om.model(xx)
        y.square().sum().backward()
        outs.append((y.detach(), xx.grad, om.q["0.weight"].grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
