import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedray.config import DeviceProfileSpec, KeepRateConfig, OMCConfig, ServiceLimits, TrainConfig
from fedray.orchestrator.spec import JobSpec, SpecError, TrainingSpec, job_schema


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
        ({"trainig": {}}, "trainig"),
        ({"training": {"epochs": 3}}, "training.epochs"),
        ({"data": {"num_clients": 10}, "training": {"clients_per_round": 20}}, "training.clients_per_round"),
        ({"seed": -1}, "seed"),
        ({"training": {"rounds": 2.0}}, "training.rounds"),
        ({"training": {"client_eval": "yes"}}, "training.client_eval"),
        ({"training": {"lr": float("nan")}}, "training.lr"),
        ({"omc": {"block_bytes": 2}}, "omc.block_bytes"),
        ({"population": {"availability_concentration": 0}}, "population.availability_concentration"),
        ({"service": {"max_update_bytes": 0}}, "service.max_update_bytes"),
        ({"dropout": {"keep_rates": [0.5, 0]}}, "dropout.keep_rates[1]"),
        ({"dropout": {"scaling": "half"}}, "dropout.scaling"),
        ({"task": {"target": "not an import string"}}, "task.target"),
        ({"task": {"params": {"a": 1}}}, "task.params"),
        ({"task": {"target": "mytask:MyTask"}, "model": {"kind": "cnn"}}, "model"),
        ({"task": {"target": "mytask:MyTask"}, "data": {"dataset": "digits"}}, "data.dataset"),
        ({"strategy": {"name": "median"}, "dropout": {}}, "dropout"),
        ({"training": {"min_clients": 5, "clients_per_round": 2}, "data": {"num_clients": 10}}, "training.min_clients"),
        ({"compression": {"codec_params": [1]}}, "compression.codec_params"),
        ({"privacy": {"clip_norm": 1.0}}, "privacy.noise_multiplier"),
    ],
)
def test_bad_field_is_named(doc, field):
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(doc)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_wording_of_todays_messages():
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict({"training": {"rounds": 0}})
    assert str(e.value) == "training.rounds: must be an integer >= 1, got 0"
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict({"training": {"epochs": 3}})
    assert str(e.value).startswith("training.epochs: unknown field; training has: local_epochs, batch_size, lr,")


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"compression": {"codec": "nope"}}, "compression.codec"),
        ({"compression": {"codec": "int8", "codec_params": {"granularity": "row"}}}, "compression.codec_params"),
        ({"compression": {"broadcast": "p2u", "broadcast_params": {"stage_bits": [0]}}},
         "compression.broadcast_params"),
    ],
)
def test_codec_names_and_params_are_checked_against_the_registry(doc, field):
    spec = JobSpec.from_dict(doc)  # parsing does not load the codecs (nor torch)
    with pytest.raises(SpecError) as e:
        spec.check_plugins()
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
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(SpecError, match="the job spec is empty"):
        JobSpec.from_yaml(empty)
    for text in ("- training\n- data\n", "rounds\n", "5\n"):
        empty.write_text(text)
        with pytest.raises(SpecError, match="must be a mapping of sections"):
            JobSpec.from_yaml(empty)


def test_yaml_lists_become_tuples(tmp_path: Path):
    p = tmp_path / "j.yaml"
    p.write_text("model: {hidden: [64, 32]}\ntraining: {lr: 1}\n")
    s = JobSpec.from_yaml(p)
    assert s.model.hidden == (64, 32) and s.training.lr == 1.0


def test_runtime_configs_are_the_spec_sections():
    s = JobSpec.from_dict({"omc": {"block_bytes": 4096}, "population": {"availability": 0.5,
                           "availability_concentration": 3.0}, "service": {"max_update_bytes": 1 << 20}})
    assert isinstance(s.omc, OMCConfig) and s.omc.block_bytes == 4096
    s = s.replace(omc=None, dropout={"keep_rates": [0.5, 1.0], "probs": [0.25, 0.75]})
    assert isinstance(s.population, DeviceProfileSpec) and s.population.availability_concentration == 3.0
    assert isinstance(s.service, ServiceLimits) and s.service.max_update_bytes == 1 << 20
    assert isinstance(s.dropout, KeepRateConfig) and s.dropout.rates == (0.5, 1.0)
    assert isinstance(s.training, TrainConfig)
    with pytest.raises(SpecError, match="omc.bits"):
        OMCConfig(bits=0)


def test_replace_validates_and_model_is_frozen():
    s = JobSpec()
    assert s.replace(seed=3).seed == 3 and s.seed == 0
    with pytest.raises(SpecError, match="^seed:"):
        s.replace(seed=-3)
    with pytest.raises(SpecError, match="^training.lr:"):
        s.training.replace(lr=0)
    with pytest.raises(Exception):
        s.seed = 4


def test_every_example_spec_loads():
    paths = sorted(Path(__file__).parent.parent.glob("examples/**/*.yaml"))
    assert paths
    for p in paths:
        JobSpec.from_yaml(p).check_plugins()


def test_parsing_imports_neither_torch_nor_ray(tmp_path: Path):
    p = tmp_path / "job.yaml"
    p.write_text("training: {rounds: 2}\ncompression: {codec: topk, codec_params: {ratio: 0.1}}\n"
                 "privacy: {noise_multiplier: 1.0, clip_norm: 1.0}\ntask: {target: 'pkg.mod:MyTask'}\n")
    code = ("import sys; from fedray.orchestrator.spec import JobSpec; from fedray.orchestrator.cli import main; "
            f"s = JobSpec.from_yaml({str(p)!r}); JobSpec.from_dict(s.to_dict()); "
            f"assert main(['schema', '--out', {str(tmp_path / 's.json')!r}]) == 0; "
            "print(sorted(m for m in ('torch', 'ray', 'grpc', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_schema_command_prints_the_job_schema(tmp_path: Path, capsys):
    from fedray.orchestrator.cli import main

    assert main(["schema", "--out", str(tmp_path / "s.json")]) == 0
    schema = json.loads((tmp_path / "s.json").read_text())
    assert schema == job_schema()
    assert schema["additionalProperties"] is False and "training" in schema["properties"]
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema
