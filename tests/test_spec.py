from pathlib import Path

import pytest

from fedray.orchestrator.spec import JobSpec, SpecError, TrainingSpec


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path: Path):
    spec = JobSpec()
    p = tmp_path / "job.yaml"
    p.write_text(spec.to_yaml())
    assert JobSpec.from_yaml(p) == spec


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"training": {"rounds": 0}}, "training.rounds"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"training": {"rounds": "five"}}, "training.rounds"),
        ({"data": {"dataset": "cifar"}}, "data.dataset"),
        ({"data": {"partition": "zipf"}}, "data.partition"),
        ({"data": {"alpha": 0}}, "data.alpha"),
        ({"model": {"hidden": [0]}}, "model.hidden[0]"),
        ({"compression": {"codec": "nope"}}, "compression.codec"),
        ({"compression": {"codec": "int8", "codec_params": {"granularity": "row"}}}, "compression.codec_params"),
        ({"trainig": {}}, "trainig"),
        ({"training": {"epochs": 3}}, "training.epochs"),
        ({"data": {"num_clients": 10}, "training": {"clients_per_round": 20}}, "training.clients_per_round"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_field_is_named(doc, field):
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(doc)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_construction_validates():
    with pytest.raises(SpecError, match="training.batch_size"):
        TrainingSpec(batch_size=0)


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(SpecError, match="does not exist"):
        JobSpec.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        JobSpec.from_yaml(bad)


def test_yaml_lists_become_tuples(tmp_path: Path):
    p = tmp_path / "j.yaml"
    p.write_text("model: {hidden: [64, 32]}\ntraining: {lr: 1}\n")
    s = JobSpec.from_yaml(p)
    assert s.model.hidden == (64, 32) and s.training.lr == 1.0
