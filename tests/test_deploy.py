"""deploy/: the Dockerfiles and the Kubernetes / KServe manifests parse, validate, hang together, and
name only ports, paths, flags, settings, files and metrics that the real server has.

No Docker engine or cluster runs here. The Dockerfiles are parsed (every COPY source exists and gets
through the ignore file, the pinned versions are the ones the tests run); the Kubernetes objects are
validated against the Kubernetes schemas (kubernetes-validate, strict); the custom resources it has
no schema for (KServe InferenceService, KEDA ScaledObject, Kustomization, the prometheus-adapter
values) have their required structure checked here, and the pod template inside the
InferenceService is validated as a Pod. The live half starts the real ``tandem serve`` (as the
image's ENTRYPOINT would, with the image's ENV) on 127.0.0.1 and checks every probe path and metric
name the manifests mention against it, and runs examples/cloud/run_local.sh's three cases.
The metric queries run against a real Prometheus in tests/test_autoscale_queries.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from support import make_bundle
from tandem.shared.protocol import CONTENT_TYPE, InferRequest, infer_path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
CONSTRAINTS = DEPLOY / "constraints.txt"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))
PORT = 8000  # the port every manifest must agree on
METRIC_RE = re.compile(r"\btandem_[a-z0-9_]+\b")

server_missing = importlib.util.find_spec("tandem.cloud.app") is None or importlib.util.find_spec("tandem.cloud.cli") is None
needs_server = pytest.mark.skipif(server_missing, reason="tandem.cloud.app / tandem.cloud.cli (core's server) has not landed yet")


# --- parsing ------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def one(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for k, rest in instructions if k == keyword]
    assert len(found) == 1, f"expected exactly one {keyword}, found {len(found)}"
    return found[0]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for k, rest in instructions:
        if k == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def yaml_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in YAML_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path}: every YAML document must be a mapping"
            docs.append((path, doc))
    return docs


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in yaml_docs() if "kind" in d]


def walk(node: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """(key, value) of every value in a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]["containers"]
    return []


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]["predictor"]


def probe_paths() -> set[str]:
    """Every HTTP path a manifest or the Dockerfile's HEALTHCHECK will request from the server."""
    paths = set()
    for _, doc in k8s_objects():
        for k, v in walk(doc):
            if k == "httpGet":
                paths.add(v["path"])
            if k == "exec":
                paths.add(healthcheck_path(v["command"]))
            if k == "prometheus.io/path":
                paths.add(v)
    paths.add(healthcheck_path(healthcheck_cmd()))
    return paths


def healthcheck_cmd(dockerfile: Path = DOCKERFILE) -> list[str]:
    health = one(dockerfile_instructions(dockerfile), "HEALTHCHECK")
    return json.loads(health[health.index("CMD") + 3 :])


def healthcheck_path(command: list[str]) -> str:
    assert command[0] == "tandem-healthcheck", f"unexpected exec probe {command}"
    assert len(command) == 2 and command[1].startswith("/"), command
    return command[1]


def mentioned_metrics() -> set[str]:
    names = set()
    for path in [*YAML_FILES, DEPLOY / "README.md"]:
        names.update(METRIC_RE.findall(path.read_text()))
    return names


# --- static checks ------------------------------------------------------------------------------


def test_every_yaml_parses_and_names_its_objects() -> None:
    assert len(YAML_FILES) >= 8
    objects = k8s_objects()
    kinds = {d["kind"] for _, d in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject", "InferenceService", "ConfigMap"} <= kinds
    for path, doc in objects:
        assert doc.get("apiVersion"), f"{path}: no apiVersion"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} has no metadata.name"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), f"kustomization names missing {resource}"
    assert "keda-scaledobject.yaml" not in kustomization["resources"], "HPA and KEDA must not both scale the Deployment"


def test_manifests_hang_together() -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, doc in k8s_objects():
        by_kind.setdefault(doc["kind"], []).append(doc)
    (deployment,) = by_kind["Deployment"]
    (service,) = by_kind["Service"]
    name = deployment["metadata"]["name"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()

    ports = {p["name"]: p["containerPort"] for c in containers(deployment) for p in c["ports"]}
    for sp in service["spec"]["ports"]:
        target = sp["targetPort"]
        assert target in ports or target in ports.values(), f"Service targets {target}, the pod has {ports}"

    for scaler in by_kind["HorizontalPodAutoscaler"] + by_kind["ScaledObject"]:
        assert scaler["spec"]["scaleTargetRef"]["name"] == name
        assert scaler["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "tandem_inference_pending_request_count"
    (keda,) = by_kind["ScaledObject"]
    assert "tandem_inference_pending_request_count" in keda["spec"]["triggers"][0]["metadata"]["query"]
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == "tandem_inference_pending_request_count"

    configmaps = {d["metadata"]["name"] for d in by_kind["ConfigMap"]}
    for doc in by_kind["Deployment"] + by_kind["InferenceService"]:
        spec = pod_spec(doc)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in containers(doc):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{doc['kind']} mounts undeclared volume {mount['name']}"
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, f"{doc['kind']} container has no {probe}"
            ready = c["readinessProbe"]
            path = ready["httpGet"]["path"] if "httpGet" in ready else healthcheck_path(ready["exec"]["command"])
            assert path == "/v2/health/ready"
            assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"no ConfigMap {v['configMap']['name']}"
    sec = deployment["spec"]["template"]["spec"]["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0


def test_every_port_is_the_one_the_server_listens_on() -> None:
    seen = []
    for path, doc in k8s_objects():
        for k, v in walk(doc):
            if k in ("containerPort", "prometheus.io/port") or (k == "port" and isinstance(v, (int, str)) and str(v).isdigit()):
                seen.append((path.name, k, int(v)))
    for dockerfile in DOCKERFILES:
        instructions = dockerfile_instructions(dockerfile)
        seen.append((dockerfile.name, "EXPOSE", int(one(instructions, "EXPOSE"))))
        assert healthcheck_cmd(dockerfile)[0] == "tandem-healthcheck"
        entry = json.loads(one(instructions, "ENTRYPOINT"))
        seen.append((dockerfile.name, "ENTRYPOINT", int(entry[entry.index("--port") + 1])))
    default = re.search(r'os\.environ\.get\("TANDEM_PORT", "(\d+)"\)', (DEPLOY / "healthcheck.py").read_text())
    assert default, "deploy/healthcheck.py should default to TANDEM_PORT or a literal port"
    seen.append(("healthcheck.py", "TANDEM_PORT default", int(default.group(1))))
    assert len(seen) >= 10
    assert {p for *_, p in seen} == {PORT}, seen


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_the_image_as_specified(dockerfile: Path) -> None:
    ins = dockerfile_instructions(dockerfile)
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = "\n".join(rest for k, rest in ins if k == "RUN")
    assert "pip install --no-deps ." in runs
    assert "grep -c '^onnxruntime'" in runs and "-eq 1" in runs, "the image must assert exactly one onnxruntime"
    # The dependency layer installs the tested versions: every pip install of requirements is constrained.
    installs = re.findall(r"pip install (?!--no-deps)[^&]*", runs)
    assert installs and all("-c constraints.txt" in i for i in installs), installs
    assert any("-r /tmp/requirements.txt" in i for i in installs)
    copies = [rest for k, rest in ins if k == "COPY"]
    assert any("deploy/constraints.txt" in c.split() for c in copies), "the image must COPY deploy/constraints.txt"
    if dockerfile.name == "Dockerfile":
        assert "onnxruntime-gpu" in runs and "--without onnxruntime" in runs
    else:
        assert "onnxruntime-gpu" not in runs and "--without" not in runs and "pip check" in runs
        assert dockerfile_env(ins)["TANDEM_PROVIDERS"] == '["CPUExecutionProvider"]'

    user = one(ins, "USER").split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(rf"useradd .*--uid {user}\b", runs), "USER must name the user the image creates"

    assert healthcheck_path(healthcheck_cmd(dockerfile)) == "/v2/health/ready"
    assert any(k == "COPY" and rest.split()[-1] == "/usr/local/bin/tandem-healthcheck" for k, rest in ins)
    entry = json.loads(one(ins, "ENTRYPOINT"))
    assert entry[:2] == ["tandem", "serve"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    assert entry[entry.index("--repository") + 1] == "/models"

    # Everything COPY'd exists and is let through by the build's ignore file (BuildKit reads
    # <Dockerfile>.dockerignore next to the Dockerfile).
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for k, rest in ins:
        if k == "COPY":
            *sources, _dest = [w for w in rest.split() if not w.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by Dockerfile.dockerignore"
    # pyproject's packages must all be in the image, or `pip install .` fails inside the build.
    copied = {next(w for w in rest.split() if not w.startswith("--")) for k, rest in ins if k == "COPY"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    for folder in set(re.findall(r'^"tandem\.[\w.]+" = "(\w+)', pyproject, re.MULTILINE)):
        assert folder in copied, f"package folder {folder}/ is not copied into the image"


def test_runtime_requirements_are_the_base_and_cloud_dependencies() -> None:
    def run(*extra: str) -> list[str]:
        return subprocess.run(
            [sys.executable, str(DEPLOY / "runtime_requirements.py"), str(ROOT / "pyproject.toml"), *extra],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.splitlines()

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["cloud"]
    assert sorted(run()) == sorted(deps)
    gpu = run("--without", "onnxruntime")
    ort = [d for d in deps if d.startswith("onnxruntime")]
    assert ort and not any(o.startswith("onnxruntime") for o in gpu)
    assert sorted(gpu + ort) == sorted(deps)


def _constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert name and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[name] = version
    return pins


def test_constraints_are_the_versions_the_tests_run() -> None:
    """deploy/constraints.txt is what deploy/constraints.py writes in this environment: every runtime
    distribution of tandem[cloud], at the version these tests import."""
    import onnxruntime

    spec = importlib.util.spec_from_file_location("deploy_constraints", DEPLOY / "constraints.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert CONSTRAINTS.read_text() == module.render(module.pinned()), (
        "deploy/constraints.txt is stale: python deploy/constraints.py > deploy/constraints.txt"
    )
    pins = _constraint_pins()
    for needed in ("onnxruntime", "numpy", "aiohttp", "httptools", "prometheus-client", "uvloop", "redis", "pydantic"):
        assert needed in pins, f"constraints.txt does not pin {needed}"
    for build_only in ("torch", "onnx", "scikit-learn", "scipy", "matplotlib", "tqdm"):
        assert build_only not in pins, f"{build_only} is not a runtime dependency of the cloud image"
    assert pins["onnxruntime"] == onnxruntime.__version__


def test_both_images_run_the_onnxruntime_the_tests_run() -> None:
    import onnxruntime

    gpu = dict(a.partition("=")[::2] for k, a in dockerfile_instructions(DEPLOY / "Dockerfile") if k == "ARG")
    assert gpu["ORT_GPU_VERSION"] == onnxruntime.__version__, (
        f"the GPU image pins onnxruntime-gpu {gpu['ORT_GPU_VERSION']}, the tests run {onnxruntime.__version__}"
    )
    # The CPU image takes onnxruntime from constraints.txt (checked above) and asserts it at build time.
    cpu_runs = "\n".join(rest for k, rest in dockerfile_instructions(DEPLOY / "Dockerfile.cpu") if k == "RUN")
    assert "sed -n 's/^onnxruntime==//p' constraints.txt" in cpu_runs
    assert not re.search(r"pip install[^&]*onnxruntime", cpu_runs), "the CPU image must not pin onnxruntime apart from constraints.txt"


# --- Kubernetes schemas --------------------------------------------------------------------------

#: kinds kubernetes-validate has no schema for; their structure is checked by the tests below.
CUSTOM_KINDS = {"InferenceService", "ScaledObject", "Kustomization"}


def _validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_every_kubernetes_object_validates_against_the_schemas() -> None:
    import kubernetes_validate

    validated = []
    for path, doc in k8s_objects():
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} does not validate: {e.message} at {list(e.path)}")
        validated.append(doc["kind"])
    assert sorted(validated) == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace",
                                        "PersistentVolumeClaim", "Service"]), validated
    # The validation is strict: an unknown field is an error, not a warning.
    deployment = next(d for _, d in k8s_objects() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_inferenceservice_pod_validates_and_has_kserves_required_structure() -> None:
    """KServe's PredictorSpec inlines a PodSpec: its containers and volumes are validated as a Pod's;
    the rest (apiVersion, predictor, replicas, scale metric, deployment mode) is checked here."""
    (doc,) = [d for _, d in k8s_objects() if d["kind"] == "InferenceService"]
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    predictor = doc["spec"]["predictor"]
    pod_fields = {k: v for k, v in predictor.items() if k in ("containers", "volumes", "terminationGracePeriodSeconds")}
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_fields})
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # what KServe's custom predictors are named
    assert 0 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in {"concurrency", "rps", "cpu", "memory"}
    assert isinstance(predictor["scaleTarget"], int) and predictor["scaleTarget"] > 0
    mode = doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    assert mode in {"Serverless", "RawDeployment", "ModelMesh"}
    env = {e["name"]: e for e in container["env"]}
    assert env["STORAGE_URI"]["value"].startswith("pvc://")
    assert container["args"][container["args"].index("--repository") + 1] == "/mnt/models"


def test_keda_scaledobject_has_kedas_required_structure() -> None:
    (doc,) = [d for _, d in k8s_objects() if d["kind"] == "ScaledObject"]
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    spec = doc["spec"]
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    assert spec["scaleTargetRef"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for key in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] > 0
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        # KEDA's prometheus scaler requires these three; its metadata values are strings.
        assert {"serverAddress", "query", "threshold"} <= set(meta)
        assert all(isinstance(v, str) for v in meta.values()), meta
        assert meta["serverAddress"].startswith(("http://", "https://"))
        assert float(meta["threshold"]) > 0


def test_kustomization_and_adapter_values_have_the_required_structure() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "namespace", "images", "labels", "commonLabels"}
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    assert adapter["prometheus"]["url"].startswith("http") and isinstance(adapter["prometheus"]["port"], int)
    for rule in adapter["rules"]["custom"]:
        assert {"seriesQuery", "resources", "name", "metricsQuery"} <= set(rule)
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_readme_explains_build_run_and_scale() -> None:
    text = (DEPLOY / "README.md").read_text()
    for words in ("docker build -f deploy/Dockerfile", "kubectl apply -k deploy/k8s", "prometheus-adapter", "KEDA", "KServe", "nvidia.com/gpu"):
        assert words in text, f"deploy/README.md should cover {words!r}"


# --- against the real server --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def run_serve(tmp: Path, extra_env: dict[str, str] | None = None, dockerfile: Path = DOCKERFILE) -> Iterator[tuple[str, int]]:
    """`tandem serve` as the image runs it: ENTRYPOINT flags (with loopback host/port and a temp
    repository), the Deployment's args, the image's ENV. Yields (base URL, port) once ready."""
    from support import make_keys

    private, public = make_keys(tmp / "keys")
    make_bundle(tmp / "repo" / "toy" / "1", private, name="toy", version="1")
    port = _free_port()
    entry = json.loads(one(dockerfile_instructions(dockerfile), "ENTRYPOINT"))
    args = list(entry[2:])
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    args[args.index("--repository") + 1] = str(tmp / "repo")
    deployment = next(d for _, d in k8s_objects() if d["kind"] == "Deployment")
    extra = list(containers(deployment)[0]["args"])
    extra[extra.index("--trusted-key") + 1] = str(public)

    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(dockerfile_env(dockerfile_instructions(dockerfile)))
    # The image's state paths (/var/lib/tandem/...) moved into the test's own directory.
    for key, value in list(env.items()):
        if value.startswith("/var/lib/tandem/"):
            env[key] = str(tmp / "state" / value.removeprefix("/var/lib/tandem/"))
    env["TANDEM_INTRA_OP_THREADS"] = "1"
    env["TANDEM_WARMUP_BATCH_SIZES"] = "[1]"
    env.update(extra_env or {})
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.shared.cli", "serve", *args, *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"tandem serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if _get(f"{base}/v2/health/live")[0] == 200 and _healthcheck(port, env.get("TANDEM_API_KEYS")) == 0:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"tandem serve not ready in 90 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield base, port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _healthcheck(port: int, api_keys: str | None, path: str = "/v2/health/ready") -> int:
    """Run deploy/healthcheck.py as the container runs it (its own process, the container's env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env["TANDEM_PORT"] = str(port)
    if api_keys is not None:
        env["TANDEM_API_KEYS"] = api_keys
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), path], check=False, env=env, capture_output=True, timeout=30).returncode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_serve(tmp_path_factory.mktemp("deploy")) as (base, _port):
        yield base


@needs_server
def test_image_and_manifest_flags_are_real_serve_flags() -> None:
    """The ENTRYPOINT plus each manifest's args parse with the real `tandem serve` parser."""
    from tandem.cloud.cli import serve
    from tandem.cloud.config import ServerConfig

    parser = argparse.ArgumentParser()
    serve(parser)
    entry = json.loads(one(dockerfile_instructions(), "ENTRYPOINT"))[2:]
    # Flags left unset fall through to ServerConfig's defaults.
    assert ServerConfig.model_fields["port"].default == PORT, "the server's default port differs from the manifests'"
    for _, doc in k8s_objects():
        for c in containers(doc):
            args = parser.parse_args(entry + list(c.get("args", [])))
            assert args.host == "0.0.0.0" and int(args.port) == PORT
    def known(key: str) -> bool:
        """TANDEM_A__B is field b of the model in field a (pydantic-settings' nested delimiter)."""
        model: Any = ServerConfig
        for part in key.removeprefix("TANDEM_").lower().split("__"):
            fields = getattr(model, "model_fields", {})
            if part not in fields:
                return False
            model = fields[part].annotation
        return True

    for dockerfile in DOCKERFILES:
        for key in dockerfile_env(dockerfile_instructions(dockerfile)):
            if key.startswith("TANDEM_"):
                assert known(key), f"{dockerfile.name} sets {key}, which the server does not read"
    assert not known("TANDEM_JOBS__NO_SUCH_FIELD") and not known("TANDEM_NO_SUCH_FIELD")
    for _, doc in k8s_objects():
        for c in containers(doc):
            for e in c.get("env", []):
                if e["name"].startswith("TANDEM_"):
                    assert known(e["name"]), f"{doc['kind']} sets unknown {e['name']}"


def test_the_grace_period_outlasts_the_drain_and_the_exit_bound() -> None:
    """The kubelet's SIGKILL comes terminationGracePeriodSeconds after SIGTERM: the server's delay
    plus its drain must fit in it, or a rolling update cuts accepted requests; and so must the
    bound past which a process that hangs ends itself, or its stacks never reach the log."""
    from tandem.cloud.config import EXIT_GRACE_S, ServerConfig
    from tandem.cloud.workers import _KILL_MARGIN_S

    pods = [doc["spec"]["template"]["spec"] for _, doc in k8s_objects() if doc["kind"] == "Deployment"]
    pods += [doc["spec"]["predictor"] for _, doc in k8s_objects() if doc["kind"] == "InferenceService"]
    assert len(pods) >= 2
    for pod in pods:
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            delay = float(env.get("TANDEM_SHUTDOWN_DELAY_S") or ServerConfig.model_fields["shutdown_delay_s"].default)
            drain = float(env.get("TANDEM_SHUTDOWN_TIMEOUT_S") or ServerConfig.model_fields["shutdown_timeout_s"].default)
            assert delay > 0, "without a shutdown delay, connections sent while the endpoints update are refused"
            assert pod.get("terminationGracePeriodSeconds", 30) >= delay + drain + EXIT_GRACE_S + _KILL_MARGIN_S


@needs_server
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_writes_nothing_into_the_read_only_repository(dockerfile: Path, tmp_path: Path) -> None:
    """The manifests mount the repository read-only: with the image's ENV, every file the server
    writes (feedback, jobs, ...) goes to the state volume, none into the repository."""
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()

    def written(root: Path) -> set[str]:
        return {f for f in files(root) if f.split("/")[0] != "toy"}  # the bundle is repo/toy/1

    with run_serve(tmp_path, dockerfile=dockerfile) as (base, _port):
        body = InferRequest({"input": np.zeros((1, 64), np.float32)}).to_wire()
        req = urllib.request.Request(base + infer_path("toy"), data=body, headers={"Content-Type": CONTENT_TYPE}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        assert not written(tmp_path / "repo"), f"written into the repository: {written(tmp_path / 'repo')}"
    assert not written(tmp_path / "repo"), f"written into the repository: {written(tmp_path / 'repo')}"
    assert files(tmp_path / "state"), "the state volume holds the server's databases"


@needs_server
def test_every_probe_path_answers_200(served: str) -> None:
    paths = probe_paths()
    assert {"/v2/health/ready", "/v2/health/live", "/metrics"} <= paths
    for path in sorted(paths):
        status, body = _get(served + path)
        assert status == 200, f"GET {path} -> {status}: {body[:200]!r}"


@needs_server
def test_every_metric_the_manifests_name_is_exported(served: str) -> None:
    names = mentioned_metrics()
    assert "tandem_inference_pending_request_count" in names
    # One real inference, so that per-model series have samples.
    body = InferRequest({"input": np.zeros((1, 64), np.float32)}).to_wire()
    req = urllib.request.Request(served + infer_path("toy"), data=body, headers={"Content-Type": CONTENT_TYPE}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    # And one failure (wrong input name), so that the failure counter has a series too.
    bad = InferRequest({"nope": np.zeros((1, 64), np.float32)}).to_wire()
    req = urllib.request.Request(served + infer_path("toy"), data=bad, headers={"Content-Type": CONTENT_TYPE}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 400
    status, metrics = _get(served + "/metrics")
    assert status == 200
    exported = {line.split("{")[0].split(" ")[0] for line in metrics.decode().splitlines() if line and not line.startswith("#")}
    # Histograms export name_bucket/_sum/_count; counters name_total.
    for name in sorted(names):
        assert name in exported or f"{name}_count" in exported or f"{name}_bucket" in exported, (
            f"{name} is named in deploy/ but /metrics does not export it"
        )


@needs_server
def test_readiness_check_works_with_api_keys_on(tmp_path: Path) -> None:
    """With auth on, /v2/health/ready needs the key: a plain httpGet probe would never pass, the
    image's tandem-healthcheck (exec probe, HEALTHCHECK) does."""
    keys = json.dumps(["s3cret", "other"])
    with run_serve(tmp_path, {"TANDEM_API_KEYS": keys}) as (base, port):
        assert _get(base + "/v2/health/live")[0] == 200
        assert _get(base + "/v2/health/ready")[0] == 401
        assert _healthcheck(port, keys) == 0
        assert _healthcheck(port, "s3cret") == 0  # one bare key works too
        assert _healthcheck(port, None) == 1
        assert _healthcheck(port, json.dumps(["wrong"])) == 1
        assert _healthcheck(port, keys, "/v2/health/live") == 0
    assert _healthcheck(port, keys) == 1  # server gone: unhealthy, not a hang


# --- examples/cloud/run_local.sh: the same steps without a container ------------------------------

RUN_LOCAL = ROOT / "examples" / "cloud" / "run_local.sh"


def _run_local(repo: Path, keys: Path, port: int, log: Path, build_flags: str = "") -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(TANDEM_KEYS=str(keys), TANDEM_INTRA_OP_THREADS="1", TANDEM_WARMUP_BATCH_SIZES="[1]", BUILD_FLAGS=build_flags)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.Popen(["bash", str(RUN_LOCAL), str(repo), str(port)], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)


def _wait_models(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"run_local.sh exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get(f"http://127.0.0.1:{port}/v2/health/ready")[0] == 200:
                return [m["name"] for m in json.loads(_get(f"http://127.0.0.1:{port}/v1/registry/models")[1])["models"]]
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"run_local.sh did not serve within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


@pytest.mark.timeout(900)
def test_run_local_builds_with_the_key_it_makes_and_serves_what_that_key_signed(tmp_path: Path) -> None:
    """From nothing: a fresh key pair, the digits bundle signed with it, served and ready."""
    repo, keys, port = tmp_path / "repo", tmp_path / "keys", _free_port()
    proc = _run_local(repo, keys, port, tmp_path / "run_local.log", build_flags="--quick")
    try:
        assert _wait_models(proc, port, tmp_path / "run_local.log", timeout=800) == ["digits"]
    finally:
        _stop_group(proc)
    assert (keys / "tandem.key").is_file() and (keys / "tandem.pub").is_file()
    assert proc.returncode == 0, (tmp_path / "run_local.log").read_text()[-2000:]


def test_run_local_serves_a_repository_its_key_signed(tmp_path: Path) -> None:
    from support import make_keys

    private, _ = make_keys(tmp_path / "keys")
    make_bundle(tmp_path / "repo" / "toy" / "1", private, name="toy", version="1")
    port = _free_port()
    proc = _run_local(tmp_path / "repo", tmp_path / "keys", port, tmp_path / "run_local.log")
    try:
        assert _wait_models(proc, port, tmp_path / "run_local.log", timeout=120) == ["toy"]
    finally:
        _stop_group(proc)


def test_run_local_refuses_bundles_its_key_did_not_sign(tmp_path: Path) -> None:
    """A repository signed by another key, or with no key pair at all, stops with the reason
    before any server starts; no key pair is made up for bundles that already exist."""
    from support import make_keys

    private, _ = make_keys(tmp_path / "publisher")
    make_bundle(tmp_path / "repo" / "toy" / "1", private, name="toy", version="1")
    make_keys(tmp_path / "other")
    for keys, code, says in [
        (tmp_path / "none", 2, "holds bundles but"),
        (tmp_path / "other", 1, "does not verify with"),
    ]:
        log = tmp_path / f"{keys.name}.log"
        proc = _run_local(tmp_path / "repo", keys, _free_port(), log)
        try:
            proc.wait(timeout=120)
        finally:
            _stop_group(proc)
        assert proc.returncode == code, log.read_text()
        assert says in log.read_text() and "serving" not in log.read_text(), log.read_text()
    assert not (tmp_path / "none").exists(), "run_local.sh made a key pair that signed nothing it serves"


def test_deploy_readme_commands_are_real_commands(tmp_path: Path) -> None:
    """The `tandem` lines of deploy/README.md parse with the real CLI, and the key files they name are
    the ones `tandem keygen` writes."""
    from tandem.shared.cli import build_parser

    text = (DEPLOY / "README.md").read_text()
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("tandem ")]
    assert len(commands) >= 2
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)
    subprocess.run([sys.executable, "-m", "tandem.shared.cli", "keygen", "--out", str(tmp_path / "keys")], check=True,
                   capture_output=True, timeout=60)
    written = {p.name for p in (tmp_path / "keys").iterdir()}
    # keys/... as written by keygen; /etc/tandem/keys/... is where the container mounts them.
    pattern = r"(?<!/etc/tandem/)keys/([\w.-]+)"
    named = set(re.findall(pattern, text)) | set(re.findall(pattern, (DEPLOY / "k8s" / "trusted-keys.yaml").read_text()))
    assert named and named <= written, f"deploy/ names key files {named - written} that tandem keygen does not write ({written})"
    assert "--key keys/tandem.key" in text, "the Docker section must sign the bundles with the key the server trusts"
