"""Plug-ins: codecs and strategies found through entry points (in any process that asks for
them), strategies added with register_strategy, unknown names listing the known ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fedray.compression import UnknownCodecError, get_codec
from fedray.orchestrator.spec import SpecError
from fedray.orchestrator.strategy import FedAvg, StrategySpec, register_strategy
from fedray.plugins import PluginError, import_target


def _plugin_dist(root) -> None:
    """A distribution `fedray-demo-plugins` on `root`, with one codec and one strategy entry point."""
    dist = root / "fedray_demo_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedray-demo-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fedray.codecs]\nplaincopy = demo_codec\n\n[fedray.strategies]\nfedavg_slow = demo_strategy\n")
    (root / "demo_codec.py").write_text(textwrap.dedent('''
        from fedray.compression import register_codec
        from fedray.compression.codecs.identity import Identity

        @register_codec("plaincopy")
        class PlainCopy(Identity):
            pass
    '''))
    (root / "demo_strategy.py").write_text(textwrap.dedent('''
        from fedray.orchestrator.strategy import FedAvg, register_strategy

        register_strategy("fedavg_slow", lambda s: FedAvg(server_lr=0.5 * s.server_lr))
    '''))


def test_entry_points_reach_a_fresh_process(tmp_path):
    _plugin_dist(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = ("from fedray.orchestrator.spec import JobSpec\n"
            "s = JobSpec.from_dict({'compression': {'codec': 'plaincopy'}, 'strategy': {'name': 'fedavg_slow'}})\n"
            "print(s.strategy.build().server_lr)\n"
            "from fedray.compression import get_codec\n"
            "print(get_codec('plaincopy').encode(__import__('torch').ones(3)).codec)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.5", "plaincopy"]
    codecs = subprocess.run([sys.executable, "-m", "fedray.orchestrator.cli", "codecs"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "plaincopy" in codecs.stdout.split()


def test_register_strategy_and_unknown_names():
    from fedray.orchestrator import strategy

    register_strategy("fedavg_test_double", lambda s: FedAvg(server_lr=2 * s.server_lr))
    try:
        assert StrategySpec(name="fedavg_test_double", server_lr=0.25).build().server_lr == 0.5
        with pytest.raises(SpecError, match="strategy.name: must be one of fedavg, .*fedavg_test_double"):
            StrategySpec(name="fedsomething")
    finally:
        from fedray.config.strategy import STRATEGY_PARAMS

        strategy._BUILDERS.pop("fedavg_test_double")  # other tests list the registry
        STRATEGY_PARAMS.pop("fedavg_test_double")
    with pytest.raises(UnknownCodecError, match="unknown codec 'nope'; known codecs: .*int8"):
        get_codec("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_strategy("fedavg", lambda s: FedAvg())


def test_import_target_errors():
    with pytest.raises(PluginError, match="not an import string"):
        import_target("justaname")
    with pytest.raises(PluginError, match="cannot import module 'no_such_mod_q'.*No module named"):
        import_target("no_such_mod_q:X")
    with pytest.raises(PluginError, match="has no attribute 'Nope'"):
        import_target("fedray.task:Nope")
