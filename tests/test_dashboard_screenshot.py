"""The Ray dashboard as a user sees it: Debian's headless Chromium renders the Jobs and Actors
pages of a real Ray head (its own, from tests/test_submit.py's `start_head`, with
RAY_AUTH_MODE=disabled so the browser needs no token) while a submitted fedray job's actors are
alive. The rendered pages must name the job and its actors; the screenshots must be real pictures.

Skips when no `chromium` is on the PATH (scripts/setup.sh test installs Debian's).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fedray.orchestrator.client import Client
from fedray.orchestrator.spec import JobSpec
from test_submit import QUICKSTART, _get, start_head

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on the PATH (apt-get install chromium)")]


def _chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to run as root with its sandbox; the page is our own 127.0.0.1 dashboard.
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,900",
           "--virtual-time-budget=10000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _alive_actors(url: str, jid: str) -> dict[str, str]:
    code, body = _get(f"{url}/api/v0/actors?detail=1&limit=10000", token=None)
    if code != 200:
        return {}
    return {a["name"]: a["state"] for a in json.loads(body)["data"]["result"]["result"]
            if (a.get("name") or "").startswith(f"{jid}:")}


def test_dashboard_shows_the_job_and_its_actors(tmp_path):
    spec = JobSpec.from_yaml(QUICKSTART)
    # 200 digits rounds take ~10 s here: far more than the test lasts; it stops the job at the end.
    spec = spec.replace(training=spec.training.replace(rounds=100_000))
    want = None
    with start_head(RAY_AUTH_MODE="disabled") as (url, _):
        client = Client(url, results_root=str(tmp_path / "results"))
        jid = client.submit(spec)
        want = {f"{jid}:aggregator-0", f"{jid}:worker-0", f"{jid}:worker-1"}
        try:
            deadline, alive = time.monotonic() + 60, {}
            while time.monotonic() < deadline:
                alive = _alive_actors(url, jid)
                if set(alive) >= want and all(alive[n] == "ALIVE" for n in want):
                    break
                time.sleep(1)
            assert set(alive) >= want and all(alive[n] == "ALIVE" for n in want), alive
            doms, shots = {}, {}
            for page in ("jobs", "actors"):
                doms[page] = _chromium(tmp_path, f"{url}/#/{page}", "--dump-dom").stdout
                shots[page] = tmp_path / f"{page}.png"
                run = _chromium(tmp_path, f"{url}/#/{page}", f"--screenshot={shots[page]}")
                assert shots[page].is_file(), run.stderr[-2000:]
            # The pictures show a live job and live actors.
            assert str(client.status(jid)) == "RUNNING"
            assert all(_alive_actors(url, jid).get(n) == "ALIVE" for n in want), _alive_actors(url, jid)
        finally:
            client.stop(jid)
    assert jid in doms["jobs"], doms["jobs"][-2000:]
    assert all(name in doms["actors"] for name in want), doms["actors"][-2000:]
    assert f"fedray job={jid} role=aggregator shard=0 of=1" in doms["actors"]
    import matplotlib.image

    for page, png in shots.items():
        img = matplotlib.image.imread(png)
        assert img.shape[:2] == (900, 1400), (page, img.shape)
        # A rendered page, not a blank or one-colour one: many distinct colours.
        colours = {tuple(px) for px in (img[::7, ::7, :3] * 255).astype(int).reshape(-1, 3).tolist()}
        assert len(colours) > 50, (page, len(colours))
