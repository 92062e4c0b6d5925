"""fedray across hosts: Linux network namespaces as hosts, one Ray node each, started with the
rayStartParams and env that the rendered Helm chart gives each group.

Hosts (10.250.0.0/24 on a bridge in a namespace of its own; no default route anywhere):
head .1 (Ray head, job driver), agg .2 and agg2 .5 (aggregation group), work .3 (cpu group),
ext .4 (submits through the Job Submission API) and `outside` (10.251.0.2), which reaches only
the head's second interface, where a TCP forwarder stands in for the aggregation Service.
Each host runs in a mount namespace of its own with the TLS files the chart mounts on that pod
(key and certificate on aggregation pods, the certificate alone elsewhere).

Runs as root; skipped, with the reason, where network namespaces cannot be created. Every
process is bounded by a timeout and stopped by PID; the namespaces are deleted at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fedray.orchestrator.cli import main as cli_main
from fedray.orchestrator.cluster_env import apply_cluster_env
from fedray.orchestrator.engine import JobError, JobRuntime, run_job
from fedray.orchestrator.shard import advertised_address, bind_host
from fedray.orchestrator.spec import JobSpec, SpecError
from fedray.proto.auth import client_token

try:
    from tests.helm_tools import extract_helm, load_docs, run_helm
except ImportError:
    from helm_tools import extract_helm, load_docs, run_helm  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TAG = f"fr{os.getpid() % 100000}"
HOSTS = {"head": "10.250.0.1", "agg": "10.250.0.2", "work": "10.250.0.3", "ext": "10.250.0.4", "agg2": "10.250.0.5"}
GROUP = {"head": "head", "agg": "aggregation", "agg2": "aggregation", "work": "cpu"}
OUTSIDE_IP, HEAD_OUTER_IP = "10.251.0.2", "10.251.0.1"
PUBLIC = f"{HEAD_OUTER_IP}:50051"  # the load balancer's address, given to the chart as aggregation.publicAddress
SERVER_NAME = "fedray-aggregator.fl.svc"
SECRET = "multihost-secret-0123456789"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="network namespaces are Linux only")


def _ns(host: str) -> str:
    return f"{TAG}-{host}"


def _sh(*args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def _can_make_namespaces() -> str | None:
    """None, or why network namespaces cannot be created here."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{TAG}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    for tool, pkg in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            return f"`{tool}` ({pkg}) is not installed"
    return None


# --- the address model and round outcomes, on one host ------------------------------------


def test_shards_bind_all_interfaces_and_advertise_the_node_ip():
    assert bind_host(None, "10.250.0.2") == "0.0.0.0"
    assert bind_host(None, "127.0.0.1") == "127.0.0.1"  # a local Ray: nothing else could dial it
    assert bind_host("10.9.9.9", "10.250.0.2") == "10.9.9.9"
    assert advertised_address("0.0.0.0", "10.250.0.2", 50051) == "10.250.0.2:50051"
    assert advertised_address("::", "fd00::2", 50051) == "[fd00::2]:50051"
    assert advertised_address("127.0.0.1", "10.250.0.2", 7) == "127.0.0.1:7"


def test_public_address_and_environment_errors_name_the_field():
    with pytest.raises(SpecError, match="service.public_address"):
        JobSpec.from_dict({"service": {"public_address": "no-port"}})
    with pytest.raises(SpecError, match="resources.shards: 1"):
        JobSpec.from_dict({"service": {"public_address": "lb:443"}, "resources": {"shards": 2}})
    with pytest.raises(SpecError, match="FEDRAY_GRPC_PORT"):
        apply_cluster_env(JobSpec(), {"FEDRAY_GRPC_PORT": "grpc"})


def test_a_round_past_the_failure_threshold_fails_the_job_naming_the_cause():
    lines: list[str] = []
    fake = SimpleNamespace(spec=JobSpec.from_dict({"service": {"real_clients": 2}}), log=lines.append,
                           shards=SimpleNamespace(addresses=["10.250.0.2:50051"]))
    fake._unreachable_hint = lambda failed: JobRuntime._unreachable_hint(fake, failed)
    err = "client 3, round 1, stage upload: UNAVAILABLE: ipv4:10.250.0.2:50051: Connection refused"
    failed = [SimpleNamespace(error=err)] * 3
    assert JobRuntime._check_outcome(fake, 1, 10, failed[:1], 1, 10) == 1  # 1 failed + 1 missing of 12: logged only
    assert "round 1: 1 of 10 simulated clients failed" in lines and any("1 of 2 real clients missing" in x for x in lines)
    assert JobRuntime._check_outcome(fake, 2, 10, failed + failed[:2], 2, 7) == 0  # 5 of 12: under half
    with pytest.raises(JobError, match=r"round 3: 6 of 12 clients failed or were missing.*service.host=None"):
        JobRuntime._check_outcome(fake, 3, 10, failed * 2, 2, 6)  # half of them: the job fails


def test_a_shard_resource_no_node_offers_fails_within_the_start_timeout(ray_session):
    spec = JobSpec.from_dict(_spec("no-agg", rounds=1, resources={"shard_resource": "fedray_nowhere",
                                                                  "shard_start_timeout_s": 2}))
    t0 = time.monotonic()
    with pytest.raises(JobError, match="no live node offers the Ray resource 'fedray_nowhere'"):
        run_job(spec, progress=False, log=lambda s: None)
    assert time.monotonic() - t0 < 60


def test_a_shard_that_cannot_bind_fails_the_job_naming_service_host(ray_session):
    spec = JobSpec.from_dict(_spec("bad-bind", rounds=1, service={"host": "192.0.2.1"}))  # no local address
    with pytest.raises(JobError, match=r"aggregation shard 0 failed to start: .*could not serve on 192.0.2.1:0.*"
                                       r"service.host must be an address of every node"):
        run_job(spec, progress=False, log=lambda s: None)


# --- the chart's contract, rendered --------------------------------------------------------


def _render(tmp: Path, *sets: str) -> dict[str, dict]:
    """Per group (head, cpu, aggregation): its rayStartParams and container env, as rendered."""
    base = tmp / "helm"
    base.mkdir(exist_ok=True)
    helm = base / "helm"
    if not helm.exists():
        extract_helm(base)
    args = ["template", "fedray", str(ROOT / "helm" / "fedray"), "--namespace", "fl",
            "-f", str(ROOT / "helm" / "fedray" / "ci" / "cpu-only-values.yaml"),
            "--set", f"aggregation.publicAddress={PUBLIC}", "--set", "aggregation.replicas=2"]
    for s in sets:
        args += ["--set", s]
    res = run_helm(helm, base, *args)
    assert res.returncode == 0, res.stderr
    (cluster,) = [d for d in load_docs(res.stdout) if d["kind"] == "RayCluster"]
    groups = {"head": cluster["spec"]["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]})
    out = {}
    for name, g in groups.items():
        c = g["template"]["spec"]["containers"][0]
        out[name] = {
            "params": dict(g.get("rayStartParams") or {}),
            "env": {e["name"]: e["value"] for e in c.get("env", [])},
            "cpu": str((c.get("resources") or {}).get("limits", {}).get("cpu", "1")),
            "volumes": g["template"]["spec"].get("volumes", []),
        }
    return out


def _ray_flags(group: dict) -> list[str]:
    """`ray start` flags from rayStartParams as KubeRay writes them (`--key=value` in a shell
    command), plus --num-cpus from the CPU limit when the params leave it out (as KubeRay does)."""
    params = dict(group["params"])
    params.setdefault("num-cpus", group["cpu"])
    return shlex.split(" ".join(f"--{k}={v}" for k, v in params.items()))


# --- hosts and cluster ---------------------------------------------------------------------


class Cluster:
    """The namespaces, the Ray nodes and the helper processes of this module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.chart = _render(tmp)
        self.chart_tls = _render(tmp, "aggregation.tls.enabled=true", "aggregation.tls.secretName=fedray-tls",
                                 f"aggregation.tls.mountPath={tmp / 'tls-mount'}")

    # namespaces
    def up_network(self) -> None:
        net = _ns("net")
        for cmd in (["netns", "add", net], ["-n", net, "link", "set", "lo", "up"],
                    ["-n", net, "link", "add", "br0", "type", "bridge"], ["-n", net, "link", "set", "br0", "up"]):
            _sh("ip", *cmd)
            if cmd[0] == "netns":
                self.made.append(net)
        for host, ip in HOSTS.items():
            ns = _ns(host)
            _sh("ip", "netns", "add", ns)
            self.made.append(ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "add", "v0", "netns", ns, "type", "veth", "peer", "name", f"p-{host}", "netns", net)
            _sh("ip", "-n", net, "link", "set", f"p-{host}", "master", "br0")
            _sh("ip", "-n", net, "link", "set", f"p-{host}", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "v0")
            _sh("ip", "-n", ns, "link", "set", "v0", "up")
        out = _ns("outside")
        _sh("ip", "netns", "add", out)
        self.made.append(out)
        _sh("ip", "-n", out, "link", "set", "lo", "up")
        _sh("ip", "link", "add", "o0", "netns", out, "type", "veth", "peer", "name", "o1", "netns", _ns("head"))
        _sh("ip", "-n", out, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "o0")
        _sh("ip", "-n", out, "link", "set", "o0", "up")
        _sh("ip", "-n", _ns("head"), "addr", "add", f"{HEAD_OUTER_IP}/24", "dev", "o1")
        _sh("ip", "-n", _ns("head"), "link", "set", "o1", "up")

    def make_certs(self) -> None:
        d = self.tmp / "tls-src"
        d.mkdir()

        def ssl(*args):
            _sh("openssl", *args, timeout=60)

        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt"),
            "-days", "2", "-subj", f"/CN={SERVER_NAME}", "-addext", f"subjectAltName=DNS:{SERVER_NAME}")
        (self.tmp / "tls-mount").mkdir()

    def env(self, host: str, chart: dict | None = None) -> dict[str, str]:
        """The environment of a process on `host`: the chart's container env for its group."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FEDRAY_"))}
        env.update(PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", RAY_USAGE_STATS_ENABLED="0",
                   # node deaths noticed in about 3 s instead of 30 (a test harness setting, not the chart's)
                   RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                   RAY_health_check_timeout_ms="1000", RAY_health_check_initial_delay_ms="1000")
        env.update((chart or self.chart)[GROUP.get(host, "cpu")]["env"])
        return env

    def _in_host(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` in the host's network namespace and a mount namespace of its own, where the TLS
        mount path holds what the chart mounts on that group's pods."""
        mount = self.tmp / "tls-mount"
        src = self.tmp / "tls-src"
        files = ["tls.crt", "tls.key"] if GROUP.get(host) == "aggregation" else ["tls.crt"]
        setup = (f"mount -t tmpfs -o size=1m fedray-tls {shlex.quote(str(mount))} && "
                 + " && ".join(f"cp {shlex.quote(str(src / f))} {shlex.quote(str(mount))}/" for f in files)
                 + " && exec " + shlex.join(cmd))
        return ["ip", "netns", "exec", _ns(host), "unshare", "-m", "--propagation", "private", "sh", "-c", setup]

    def start_nodes(self, hosts: list[str]) -> None:
        """`ray start` on each host (in parallel), with the flags and env of its chart group."""
        procs = {}
        for host in hosts:
            flags = _ray_flags(self.chart[GROUP[host]])
            if host == "head":
                flags += ["--head", "--port=6379", "--include-dashboard=true", "--dashboard-port=8265"]
            else:
                flags += [f"--address={HOSTS['head']}:6379"]
            cmd = [str(BIN / "ray"), "start", f"--node-ip-address={HOSTS[host]}",
                   f"--temp-dir={self.tmp / ('ray-' + host)}", "--object-store-memory=100000000",
                   "--disable-usage-stats", *flags]
            procs[host] = subprocess.Popen(["timeout", "120", *self._in_host(host, cmd)], env=self.env(host),
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for host, p in procs.items():
            out = p.communicate(timeout=130)[0]
            assert p.returncode == 0, f"ray start on {host} failed:\n{out}"

    def wait_nodes(self, n: int, timeout: float = 60) -> None:
        code = ("import ray,time; ray.init(address='auto', logging_level='ERROR'); t=time.time()\n"
                f"while len([x for x in ray.nodes() if x['Alive']]) < {n} and time.time()-t < {timeout}: time.sleep(0.5)\n"
                "print(len([x for x in ray.nodes() if x['Alive']]))")
        r = self.run("head", [sys.executable, "-c", code], timeout=timeout + 30)
        assert r.returncode == 0 and r.stdout.split()[-1] == str(n), r.stdout + r.stderr

    def run(self, host: str, cmd: list[str], *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        e = dict(env or self.env(host), RAY_ADDRESS=f"{HOSTS['head']}:6379")
        return subprocess.run(["timeout", str(int(timeout)), "ip", "netns", "exec", _ns(host), *cmd], env=e,
                              capture_output=True, text=True, timeout=timeout + 10, cwd=self.tmp)

    def popen(self, host: str, cmd: list[str], *, timeout: float, env: dict | None = None, log: Path) -> subprocess.Popen:
        e = dict(env or self.env(host), RAY_ADDRESS=f"{HOSTS['head']}:6379")
        p = subprocess.Popen(["timeout", str(int(timeout)), "ip", "netns", "exec", _ns(host), *cmd], env=e,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, cwd=self.tmp)
        self.procs.append(p)
        return p

    def raylet_pid(self, host: str) -> int | None:
        for pid in self.pids(host):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        return None

    def pids(self, host: str) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", _ns(host)], capture_output=True, text=True, timeout=10)
        return [int(x) for x in r.stdout.split()]

    def kill_host(self, host: str, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids(host):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            for ns in self.made:
                self.kill_host(ns[len(TAG) + 1:], sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and any(self.pids(ns[len(TAG) + 1:]) for ns in self.made):
                time.sleep(0.5)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    why = _can_make_namespaces()
    if why:
        pytest.skip(f"multi-host test needs network namespaces: {why}")
    # Ray's socket paths must stay under 107 bytes: a short folder, not pytest's tmp_path
    c = Cluster(Path(tempfile.mkdtemp(prefix=f"{TAG}-", dir="/tmp")))
    try:
        c.up_network()
        c.make_certs()
        c.start_nodes(["head"])
        c.start_nodes(["agg", "agg2", "work"])
        c.wait_nodes(4)
        fwd = c.tmp / "forward.py"
        fwd.write_text(FORWARDER)
        c.popen("head", [sys.executable, str(fwd), HEAD_OUTER_IP, "50051", f"{HOSTS['agg']}:50051",
                         f"{HOSTS['agg2']}:50051"], timeout=400, log=c.tmp / "forward.log")
        yield c
    finally:
        c.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert TAG not in left, f"namespaces left behind: {left}"
        if not os.environ.get("FEDRAY_MULTIHOST_KEEP"):  # set it to keep the logs and Ray's folders
            shutil.rmtree(c.tmp, ignore_errors=True)


# A TCP forwarder standing in for the aggregation Service: each connection goes to the first
# backend that accepts it (a Service routes only to ready endpoints). Lives at most 400 s.
FORWARDER = r'''
import socket, sys, threading, time
host, port, backends = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
end = time.monotonic() + 400
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
def serve(c):
    for be in backends:
        h, p = be.rsplit(":", 1)
        try:
            s = socket.create_connection((h, int(p)), timeout=2)
            s.settimeout(None)
            break
        except OSError:
            continue
    else:
        c.close(); return
    threading.Thread(target=pipe, args=(c, s), daemon=True).start()
    threading.Thread(target=pipe, args=(s, c), daemon=True).start()
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(64); ls.settimeout(1.0)
print("forwarding", flush=True)
while time.monotonic() < end:
    try:
        c, _ = ls.accept()
    except socket.timeout:
        continue
    serve(c)
'''


# --- jobs ----------------------------------------------------------------------------------


def _spec(name: str, rounds: int = 3, **extra) -> dict:
    d = {
        "name": name, "seed": 3,
        "data": {"dataset": "digits", "num_clients": 40, "partition": "iid"},
        "model": {"kind": "mlp", "hidden": [32]},
        "training": {"rounds": rounds, "clients_per_round": 6, "local_epochs": 1, "batch_size": 16, "lr": 0.2},
        "compression": {"codec": "int8", "broadcast": "identity"},
        "resources": {"num_workers": 1, "clients_per_call": 3},
    }
    for k, v in extra.items():
        d.setdefault(k, {}).update(v)
    return d


def _write(tmp: Path, d: dict) -> Path:
    p = tmp / f"{d['name']}-{uuid.uuid4().hex[:6]}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _reference(d: dict) -> dict[str, torch.Tensor]:
    """The same job on one host (the session's local Ray): its final model."""
    return run_job(JobSpec.from_dict(d), progress=False, log=lambda s: None).params


def _same_model(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def _env_var(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


def _fedray(*args: str) -> list[str]:
    return [str(BIN / "fedray"), *args]


def _addresses(log: str) -> list[str]:
    m = re.search(r"aggregation service at ([0-9.:, ]+)", log)
    assert m, log
    return [a.strip() for a in m.group(1).split(",")]


def test_job_submitted_to_the_head_runs_across_hosts_and_matches_one_host(cluster, ray_session):
    """Scenario 1: Job Submission API at the head, default `service`, shard on an aggregation
    host, worker on the worker host, the same final model as on one host."""
    d = _spec("mh-submit")
    path = _write(cluster.tmp, d)
    results = cluster.tmp / "results"
    r = cluster.run("ext", _fedray("submit", str(path), "--address", f"http://{HOSTS['head']}:8265",
                                   "--results-root", str(results), "--no-ship-code", "--follow"), timeout=150)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    shard_ip = _addresses(out)[0].rsplit(":", 1)[0]
    assert shard_ip in (HOSTS["agg"], HOSTS["agg2"]), out  # advertised node IP, bound on all interfaces
    assert _addresses(out)[0].endswith(":50051"), out  # FEDRAY_GRPC_PORT from the chart
    (job_dir,) = [p for p in results.iterdir() if p.is_dir()]
    summary = json.loads((job_dir / "summary.json").read_text())
    assert [x["clients"] for x in summary["rounds"]] == [6, 6, 6] and summary["failed_clients_total"] == 0
    assert summary["spec"]["resources"]["shard_resource"] == "fedray_aggregator"
    model = torch.load(job_dir / "model.pt", weights_only=True)
    assert _same_model(model, _reference(d)), "the cluster's final model differs from the one-host run"
    # placement: the job's worker ran on the worker host, its shard on an aggregation host
    probe = ("import json, ray; ray.init(address='auto', logging_level='ERROR')\n"
             "from ray.util.state import list_actors\n"
             "ip = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}\n"
             "print(json.dumps(sorted({(a.class_name, ip.get(a.node_id)) for a in list_actors(limit=1000)"
             " if a.class_name in ('AggregationShard', '_WorkerActor')})))")
    p = cluster.run("head", [sys.executable, "-c", probe], timeout=60)
    assert p.returncode == 0, p.stderr
    placed = {tuple(x) for x in json.loads(p.stdout.strip().splitlines()[-1])}
    assert placed == {("AggregationShard", shard_ip), ("_WorkerActor", HOSTS["work"])}, placed


def test_real_clients_through_the_forwarded_service_port_join_every_round(cluster):
    """Scenario 2: two real clients on a host that reaches only the forwarded port."""
    job_id = f"mh-real-{uuid.uuid4().hex[:6]}"
    d = _spec("mh-real", service={"job_id": job_id, "real_clients": 2, "real_client_wait_s": 60})
    path = _write(cluster.tmp, d)
    env = dict(cluster.env("head"), FEDRAY_JOB_SECRET=SECRET)
    driver = cluster.popen("head", _fedray("run", str(path), "--quiet", "--json", str(cluster.tmp / "real.json")),
                           timeout=180, env=env, log=cluster.tmp / "real-driver.log")
    clients = []
    for i, cid in enumerate((1000, 1001)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), _env_var("FEDRAY_JOB_SECRET", SECRET):
            assert cli_main(["token", "--job-id", job_id, "--client-id", str(cid)]) == 0
        tok = buf.getvalue().split()[-1]
        assert tok == client_token(SECRET, job_id, cid)
        clients.append(cluster.popen(
            "outside", _fedray("client", "--server", PUBLIC, "--job-id", job_id, "--client-id", str(cid),
                               "--token", tok, "--dataset", "digits", "--data-shard", f"{i}/2", "--timeout", "150"),
            timeout=170, log=cluster.tmp / f"real-client-{cid}.log"))
    rc = driver.wait(timeout=200)
    outs = [(cluster.tmp / f"real-client-{c}.log") for c in (1000, 1001)]
    for p in clients:
        p.wait(timeout=60)
    log = (cluster.tmp / "real-driver.log").read_text()
    assert rc == 0, log
    summary = json.loads((cluster.tmp / "real.json").read_text())
    assert [x["clients"] for x in summary["rounds"]] == [8, 8, 8], log  # 6 simulated + 2 real, every round
    assert summary["missing_real_clients_total"] == 0
    for p, f in zip(clients, outs):
        assert p.returncode == 0 and "trained in rounds [1, 2, 3]" in f.read_text(), f.read_text()


def test_workers_on_other_hosts_upload_over_tls_as_the_chart_mounts_it(cluster):
    """Scenario 4: the chart's TLS env on the driver; workers trust the CA file the chart mounts
    on their pod and check the certificate's Service name."""
    d = _spec("mh-tls")
    path = _write(cluster.tmp, d)
    env = cluster.env("head", cluster.chart_tls)
    assert env["FEDRAY_TLS_CA"].endswith("/tls.crt") and env["FEDRAY_TLS_SERVER_NAME"] == SERVER_NAME
    r = cluster.run("head", _fedray("run", str(path), "--quiet", "--json", str(cluster.tmp / "tls.json")),
                    timeout=150, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "(TLS)" in out and "service.tls_cert=" in out, out
    summary = json.loads((cluster.tmp / "tls.json").read_text())
    assert [x["clients"] for x in summary["rounds"]] == [6, 6, 6] and summary["failed_clients_total"] == 0
    worker_raylet = cluster.raylet_pid("work")
    seen = _sh("nsenter", "-t", str(worker_raylet), "-m", "ls", str(cluster.tmp / "tls-mount")).stdout.split()
    assert seen == ["tls.crt"]  # the key stays on the aggregation hosts


def test_a_shard_address_workers_cannot_reach_fails_the_job_naming_service_host(cluster):
    """A shard bound to loopback on purpose: every worker upload is refused, and the job fails
    with the address and the setting to change, not a silent success."""
    d = _spec("mh-loopback", rounds=1, service={"host": "127.0.0.1"})
    r = cluster.run("head", _fedray("run", str(_write(cluster.tmp, d)), "--quiet"), timeout=150)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "fedray: error: round 1:" in out and "6 clients failed" in out, out
    assert "Workers could not reach the aggregation service at 127.0.0.1:50051" in out, out
    assert "service.host='127.0.0.1'" in out, out


def test_aggregation_host_lost_mid_job(cluster, ray_session):
    """Scenario 3: the shard's host dies; the shard restarts on the other aggregation host and
    the job ends with the one-host model. Then, with no aggregation host left, a job fails fast."""
    # rounds take about 0.05 s here: 30 of them leave the kill time to land mid-job
    d = _spec("mh-kill", rounds=30, resources={"shard_start_timeout_s": 30})
    path = _write(cluster.tmp, d)
    log = cluster.tmp / "kill-driver.log"
    out_dir = cluster.tmp / "kill-out"
    driver = cluster.popen("head", _fedray("run", str(path), "--quiet", "--out", str(out_dir)), timeout=200, log=log)
    victim = _kill_after_round(cluster, driver, log, 3)
    rc = driver.wait(timeout=210)
    text = log.read_text()
    assert rc == 0, text
    survivor = HOSTS["agg2" if victim == "agg" else "agg"]
    assert f"restarted at {survivor}:50051" in text, text
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [x["clients"] for x in summary["rounds"]] == [6] * 30, text
    assert summary["failed_clients_total"] == 0, text  # the lost shard's clients were trained again
    model = torch.load(out_dir / "model.pt", weights_only=True)
    assert _same_model(model, _reference(d)), "lost or double-counted updates: the model differs from one host's"

    # no aggregation host left after this one: fail fast, naming the resource
    log2 = cluster.tmp / "kill2-driver.log"
    d2 = _spec("mh-kill2", rounds=100, resources={"shard_start_timeout_s": 15})
    driver = cluster.popen("head", _fedray("run", str(_write(cluster.tmp, d2)), "--quiet"), timeout=200, log=log2)
    _kill_after_round(cluster, driver, log2, 2)
    t_kill = time.monotonic()
    rc = driver.wait(timeout=150)
    text = log2.read_text()
    assert rc != 0, text
    assert time.monotonic() - t_kill < 90, text
    assert "fedray: error:" in text and "no live node offers the Ray resource 'fedray_aggregator'" in text, text


def _kill_after_round(cluster: Cluster, driver: subprocess.Popen, log: Path, r: int) -> str:
    """Wait until round r is logged, then kill the Ray node of the host holding the shard."""
    end = time.monotonic() + 120
    while time.monotonic() < end and driver.poll() is None:
        text = log.read_text()
        if re.search(rf"^round {r}/", text, re.M):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"round {r} never came:\n{log.read_text()}")
    ip = _addresses(log.read_text())[0].rsplit(":", 1)[0]
    host = next(h for h, a in HOSTS.items() if a == ip)
    cluster.kill_host(host)  # the raylet and everything on that node, at once (a lost pod)
    return host
