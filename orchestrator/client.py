"""Submit, watch and read fedray jobs on a Ray cluster through Ray's Job Submission API.

    client = Client("http://head:8265")
    job_id = client.submit(JobSpec.from_yaml("examples/quickstart.yaml"))
    for chunk in client.logs(job_id, follow=True):
        print(chunk, end="")
    res = client.result(job_id)   # summary, per-round history, model (where readable)

A submitted job runs `python -m fedray.orchestrator.cli run job.yaml --quiet --out DIR
--emit-result` on the cluster. The spec travels as `job.yaml` in the runtime_env's working_dir,
beside the user's task code (`code_dir`, by default the folder of a spec whose `task.target` is
an import string);
the fedray code travels as a runtime_env py_module (`ship_code=True`, the default) so the cluster
runs the client's version; the cluster must have fedray's dependencies (torch, grpcio, ...), as
the Helm chart's image does.

How results come back (docs/usage.md explains the trade-off): the job prints one final line
`FEDRAY_RESULT {json}` holding the summary and per-round history, which `result()` parses from
the job's logs over HTTP, so it works against any cluster. The model is in `DIR/model.pt` on the
node that ran the driver; `result()` loads it when that path is readable here (a local cluster or
a shared filesystem) and otherwise returns `model=None` with the path.

Token authentication (Ray 2.60 turns it on by default): the token is taken from `token=`, else
`RAY_AUTH_TOKEN`, else the file in `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`, and sent as
`Authorization: Bearer <token>`; without one the client sends no header (clusters started with
`RAY_AUTH_MODE=disabled`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .spec import JobSpec

__all__ = [
    "DEFAULT_ADDRESS",
    "RESULT_MARKER",
    "Client",
    "ClientError",
    "JobOutcome",
    "auth_token",
    "format_result_line",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RESULT_MARKER = "FEDRAY_RESULT "
DEFAULT_RESULTS_ROOT = "/tmp/fedray/results"  # on the cluster; point it at shared storage to read models remotely


class ClientError(RuntimeError):
    """A job could not be submitted, found, waited for or read; the message says which and why."""


@dataclass(frozen=True)
class JobOutcome:
    """What `Client.result` returns for a finished job."""

    job_id: str
    summary: dict[str, Any]  # JobResult.summary(), plus "results_dir"
    results_dir: str | None  # on the node that ran the job driver
    model: dict[str, Any] | None  # torch state dict, or None where results_dir is not readable here

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self.summary.get("rounds", []))

    @property
    def final_accuracy(self) -> float:
        return float(self.summary.get("final_accuracy", float("nan")))


def auth_token(token: str | None = None) -> str | None:
    """The Ray auth token to send: `token`, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH's file, ~/.ray/auth_token."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text().strip() or None
    return None


def format_result_line(summary: Mapping[str, Any], *, results_dir: str | None) -> str:
    """The one log line a submitted job ends with; `Client.result` parses it."""
    return RESULT_MARKER + json.dumps({**summary, "results_dir": results_dir}, separators=(",", ":"))


class Client:
    """A fedray client for one Ray cluster, addressed by its dashboard URL (http://head:8265)."""

    def __init__(
        self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, ship_code: bool = True,
        results_root: str = DEFAULT_RESULTS_ROOT, python: str = "python",
    ) -> None:
        """Connect to the cluster's Job Submission API.

        Raises:
            ClientError: the dashboard at `address` cannot be reached or refuses the token.
        """
        from ray.job_submission import JobSubmissionClient

        tok = auth_token(token)
        headers = {"Authorization": f"Bearer {tok}"} if tok else None
        self.address = address.rstrip("/")
        self.headers = dict(headers or {})
        self._ship_code = ship_code
        self._results_root = results_root
        self._python = python
        try:
            self._jobs = JobSubmissionClient(self.address, headers=headers)
        except Exception as e:  # ConnectionError, RuntimeError from Ray's SDK
            text = str(e)
            if "Authentication failed" in text or "authentication token" in text or "401" in text.split(":")[0]:
                raise ClientError(
                    f"the Ray dashboard at {self.address} refused the token: pass the cluster's token with "
                    "--token or $RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)") from None
            raise ClientError(f"cannot reach the Ray dashboard at {self.address}: {text.splitlines()[0]}") from e

    # -- submit and control ---------------------------------------------------------------

    def submit(self, spec: JobSpec | str | os.PathLike | Mapping[str, Any], *, job_id: str | None = None,
               code_dir: str | os.PathLike | None = None, py_modules: Sequence[str | os.PathLike] = ()) -> str:
        """Validate `spec` (a JobSpec, a YAML path or a mapping) and submit it; returns the job id.

        The user's code travels with the job, so the cluster needs none of it installed:
        `code_dir` becomes the job's working directory (its modules import as top-level
        modules, e.g. `task.target: mytask:MyTask`); by default, a YAML spec whose `task.target`
        is an import string ships the spec's own folder. `py_modules` are further package
        folders (or wheels) put on the cluster's import path (Ray runtime_env `py_modules`).

        Raises:
            SpecError: the spec is invalid, or `task.target` does not import here (nothing is
                submitted).
            ClientError: the cluster refused the job, or `code_dir` is too large to ship.
        """
        spec_dir = None
        if isinstance(spec, (str, os.PathLike)):
            spec_dir = Path(spec).resolve().parent
        spec = _as_spec(spec)
        spec.check_plugins()  # codec names and parameters, before anything is sent
        if spec.task is not None and spec.task.target is not None:
            code_dir = code_dir if code_dir is not None else (spec_dir if ":" in spec.task.target else None)
            _check_target(spec, code_dir)
        # One id for the job: Ray's submission id, fedray's job id inside the driver (its actor
        # names, metrics, results folder) and the id real clients name (`service.job_id`).
        job_id = job_id or spec.service.job_id or f"fedray-{_slug(spec.name)}-{uuid.uuid4().hex[:8]}"
        spec = spec.replace(service=spec.service.replace(job_id=job_id))
        out = f"{self._results_root.rstrip('/')}/{job_id}"
        entry = (f"{self._python} -m fedray.orchestrator.cli run job.yaml --quiet --emit-result "
                 f"--out {shlex.quote(out)}")
        with tempfile.TemporaryDirectory(prefix="fedray-submit-") as tmp:
            runtime_env = _runtime_env(spec, Path(tmp), ship_code=self._ship_code, code_dir=code_dir,
                                       py_modules=py_modules)
            try:
                return self._jobs.submit_job(
                    entrypoint=entry, submission_id=job_id, runtime_env=runtime_env,
                    metadata={"fedray_job": spec.name, "fedray_job_id": job_id, "fedray_results_dir": out},
                )
            except Exception as e:
                raise ClientError(f"submitting {spec.name!r} to {self.address} failed: {e}") from e

    def status(self, job_id: str):
        """The job's `ray.job_submission.JobStatus` (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).

        Raises:
            ClientError: no such job.
        """
        return self._call("status of", job_id, self._jobs.get_job_status)

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop the job; True when a stop was sent to a running job.

        Raises:
            ClientError: no such job.
        """
        return self._call("stopping", job_id, self._jobs.stop_job)

    def wait(self, job_id: str, *, timeout: float = 600.0, poll_s: float = 1.0):
        """Block until the job reaches a terminal status and return it.

        Raises:
            TimeoutError: still not finished after `timeout` seconds.
            ClientError: no such job.
        """
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st.is_terminal():
                return st
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {st} after {timeout:.0f}s")
            time.sleep(poll_s)

    def logs(self, job_id: str, *, follow: bool = False, poll_s: float = 1.0) -> Iterator[str]:
        """The job's log as text chunks: all of it once, or with `follow` new text until it ends.

        Raises:
            ClientError: no such job.
        """
        if not follow:
            yield self._call("logs of", job_id, self._jobs.get_job_logs)
            return
        seen = 0
        while True:
            done = self.status(job_id).is_terminal()  # read status first: no text is lost at the end
            text = self._call("logs of", job_id, self._jobs.get_job_logs)
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if done:
                return
            time.sleep(poll_s)

    # -- results ----------------------------------------------------------------------------

    def result(self, job_id: str, *, model: bool = True) -> JobOutcome:
        """The finished job's summary and per-round history, and its model where readable here.

        Raises:
            ClientError: the job did not succeed, or its log holds no result line.
        """
        from ray.job_submission import JobStatus

        st = self.status(job_id)
        if st != JobStatus.SUCCEEDED:
            raise ClientError(f"job {job_id} is {st}, not SUCCEEDED: no result (see `fedray logs {job_id}`)")
        text = self._call("logs of", job_id, self._jobs.get_job_logs)
        lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_MARKER)]
        if not lines:
            raise ClientError(f"job {job_id} succeeded but its log has no {RESULT_MARKER.strip()} line; "
                              "was it submitted by fedray?")
        summary = json.loads(lines[-1][len(RESULT_MARKER):])
        out = summary.get("results_dir")
        state = None
        if model and out and (Path(out) / "model.pt").is_file():
            import torch

            state = torch.load(Path(out) / "model.pt", map_location="cpu", weights_only=True)
        return JobOutcome(job_id=job_id, summary=summary, results_dir=out, model=state)

    def _call(self, what: str, job_id: str, fn):
        try:
            return fn(job_id)
        except RuntimeError as e:  # Ray's SDK raises RuntimeError for unknown ids and HTTP errors
            raise ClientError(f"{what} job {job_id} at {self.address}: {e}") from e


def _as_spec(spec: JobSpec | str | os.PathLike | Mapping[str, Any]) -> JobSpec:
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, Mapping):
        return JobSpec.from_dict(spec)
    return JobSpec.from_yaml(spec)


def _slug(name: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return s[:40] or "job"


MAX_CODE_BYTES = 64 << 20  # what a job's working_dir may carry (Ray's own limit is 500 MiB)
_CODE_IGNORE = ("__pycache__", "*.pyc", ".git", ".venv", "runs", "results", "*.pt", "*.ckpt")


def _runtime_env(spec: JobSpec, tmp: Path, *, ship_code: bool, code_dir=None, py_modules=()) -> dict[str, Any]:
    work = tmp / "job"
    if code_dir is not None:  # the user's code is the working directory; the validated spec goes on top
        src = Path(code_dir)
        if not src.is_dir():
            raise ClientError(f"code_dir {str(src)!r} is not a folder")
        shutil.copytree(src, work, ignore=shutil.ignore_patterns(*_CODE_IGNORE))
        size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        if size > MAX_CODE_BYTES:
            raise ClientError(f"code_dir {str(src)!r} holds {size / 2**20:.0f} MiB to ship (limit "
                              f"{MAX_CODE_BYTES >> 20} MiB); keep data out of it and load it on the cluster")
    else:
        work.mkdir()
    (work / "job.yaml").write_text(spec.to_yaml())
    env: dict[str, Any] = {"working_dir": str(work)}
    mods = [str(Path(m).resolve()) for m in py_modules]
    if ship_code:
        mods.insert(0, str(_stage_package(tmp / "code")))
    if mods:
        env["py_modules"] = mods
    return env


def _check_target(spec: JobSpec, code_dir) -> None:
    """Import `task.target` here (with `code_dir` first on the path) so a typo fails before
    submission, as `fedray validate` does. Raises SpecError naming `task.target`."""
    import sys

    from fedray.plugins import task_for_spec

    before = list(sys.path)
    try:
        task_for_spec(spec, base_dir=str(Path(code_dir).resolve()) if code_dir is not None else None)
    finally:
        sys.path[:] = before


def _stage_package(dest: Path) -> Path:
    """Copy the installed fedray package (its sub-packages live in separate folders) into dest/fedray."""
    from importlib.util import find_spec  # finds the folders without importing torch and friends

    pkg = dest / "fedray"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(find_spec("fedray").submodule_search_locations[0], pkg, ignore=skip)
    for sub in ("compression", "proto", "workers", "orchestrator"):
        where = find_spec(f"fedray.{sub}").submodule_search_locations[0]
        shutil.copytree(where, pkg / sub, ignore=skip, dirs_exist_ok=True)
    return pkg
