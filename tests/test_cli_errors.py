"""First-hour mistakes get a one-line error that says what to change (in-process `main([...])`)."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest

from fedray.orchestrator.cli import _readable_result, build_parser, demo_spec, main
from fedray.orchestrator.client import format_result_line
from fedray.orchestrator.engine import JobResult, RoundRecord, format_summary
from fedray.orchestrator.spec import JobSpec


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_validate_fails_on_a_missing_data_folder(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"data:\n  dataset: fashion-mnist\n  data_dir: {tmp_path / 'nowhere'}\n")
    assert main(["validate", str(spec)]) == 2
    line = _error_line(capsys)
    assert line.startswith("fedray: error: data.data_dir: no folder ") and "nowhere" in line, line


def test_validate_fails_on_a_data_folder_without_the_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    spec = tmp_path / "job.yaml"
    spec.write_text(f"data:\n  dataset: fashion-mnist\n  data_dir: {tmp_path / 'empty'}\n")
    assert main(["validate", str(spec)]) == 2
    line = _error_line(capsys)
    assert line.startswith("fedray: error: data.data_dir: Fashion-MNIST file train-images-idx3-ubyte"), line


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds: must be an integer >= 1, got 0"),
    (["--clients-per-round", "5000"], "--clients-per-round: 5000 is more than --clients=1000"),
    (["--codec", "nope"], "--codec: must be one of"),
    (["--codec-params", '{"bits": 4}'], "--codec-params: "),
])
def test_demo_flag_errors_name_the_flag(args, message, capsys):
    assert main(["demo", *args]) == 2  # fails before Ray starts
    line = _error_line(capsys)
    assert line.startswith("fedray: error: " + message), line
    assert "training." not in line and "compression." not in line and "data.num_clients" not in line, line


def _sub(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_codec_params_example_in_demo_help_works_with_the_default_codec():
    (action,) = [a for a in _sub("demo")._actions if "--codec-params" in a.option_strings]
    example = re.search(r"'(\{.*?\})'", action.help).group(1)
    a = build_parser().parse_args(["demo", "--codec-params", example])
    spec = demo_spec(a)  # checks the codec's parameters against the registry
    assert spec.compression.codec == JobSpec().compression.codec
    assert spec.compression.codec_params == json.loads(example)


def test_every_flag_has_a_help_line_and_help_shows_defaults():
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"fedray {name} {action.option_strings or action.dest}: no help"
    demo = _sub("demo").format_help()
    assert re.search(r"--rounds ROUNDS\s+training rounds \(default: 5\)", demo), demo
    assert "(default: 60.0)" in _sub("client").format_help()


def test_wrong_shaped_data_npz_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(8, np.float32), y=np.zeros(8, np.int64))  # x without a feature axis
    with pytest.raises(SystemExit) as e:
        main(["client", "--server", "127.0.0.1:1", "--job-id", "j", "--client-id", "1", "--token", "t",
              "--data-npz", str(bad)])
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith(f"fedray client: error: --data-npz {bad}: x must be numeric, shaped"), msg
    np.savez(bad, x=np.zeros((8, 4), np.float32), y=np.zeros((8, 2), np.int64))
    with pytest.raises(SystemExit) as e:
        main(["client", "--server", "127.0.0.1:1", "--job-id", "j", "--client-id", "1", "--token", "t",
              "--data-npz", str(bad)])
    assert "y must be one label per example, shape (8,), got shape (8, 2)" in str(e.value.code)


def test_logs_follow_ends_with_the_readable_summary():
    spec = JobSpec()
    rounds = [RoundRecord(round=r, clients=10, failed=0, accuracy=0.5 + r / 10, loss=1.0, bytes_up=1000, bytes_down=4000,
                          bytes_up_fp32=4000, bytes_down_fp32=4000, wall_s=1.5, train_loss=0.9) for r in (1, 2)]
    result = JobResult("job-7", spec, rounds, wall_s=3.2)
    line = format_result_line(result.summary(), results_dir="/tmp/r") + "\n"
    log = "round 1 done\nround 2 done\n" + line
    chunks = [log[i:i + 37] for i in range(0, len(log), 37)]  # lines split across chunks
    out = "".join(_readable_result(iter(chunks)))
    assert out == "round 1 done\nround 2 done\n" + format_summary(result) + "\n"
    assert "FEDRAY_RESULT" not in out


def test_demo_dropout_flags_reach_the_spec():
    a = build_parser().parse_args(["demo", "--keep-rate", "0.75", "--dropout-policy", "prefix",
                                   "--dropout-scaling", "all"])
    d = demo_spec(a).dropout
    assert (d.keep_rates, d.policy, d.scaling) == ((0.75,), "prefix", "all")
    assert demo_spec(build_parser().parse_args(["demo", "--keep-rate", "0.5"])).dropout.scaling == "none"
