"""infra/: KubeRay manifests, cluster launcher config, Docker image, MLflow server recipes.

Over 400 lines because it mirrors infra/ as one file: a section per artefact, each checked against its schema.

What is checked against what:
* KubeRay RayJob/RayService/RayCluster and the MLflow Deployment/StatefulSet/Services against
  infra/_schema/kuberay_v1_subset.json (closed JSON Schema transcribed from the KubeRay v1 CRDs; provenance in
  infra/_schema/README.md), with jsonschema (installed with ray, which requires it);
* infra/cluster-launcher/aws-gpu.yaml against the installed ray's own autoscaler/ray-schema.json, then through
  ray's prepare_config + validate_config (what `ray up` runs before touching the cloud);
* the RayService's serveConfigV2 against hiar/serving/serve_config.yaml (same content) and Ray Serve's
  ServeDeploySchema, and its placement against the worker groups;
* the RayJob's `--set` overrides against the typed config (hiar.config.load_config);
* infra/mlflow/start_local.sh for real: MLflow + moto S3 come up, a run's artifact goes through the server's
  artifact proxy into the S3 bucket and back, and SIGTERM leaves no process behind.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.services import wait_for

ROOT = Path(__file__).resolve().parents[3]
INFRA = ROOT / "infra"
SCHEMA_PATH = INFRA / "_schema" / "kuberay_v1_subset.json"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
RAYSERVICE = INFRA / "kuberay" / "rayservice.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
TEMPLATE = INFRA / "templates" / "rayservice.yaml.in"
MLFLOW_K8S = INFRA / "mlflow" / "k8s.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
START_LOCAL = INFRA / "mlflow" / "start_local.sh"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
SERVE_CONFIG = ROOT / "hiar" / "serving" / "serve_config.yaml"
EXAMPLE_SERVE_CONFIG = INFRA / "_testdata" / "serve_config.example.yaml"

KUBE_MANIFESTS = [RAYJOB, RAYSERVICE, RAYCLUSTER, MLFLOW_K8S]
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") or p.name.endswith(".yaml.in"))
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _schema_errors(doc: dict) -> list[str]:
    schema = _schema()
    kind = doc.get("kind")
    assert kind in schema["x-kinds"], f"no schema for kind {kind!r}"
    validator = jsonschema.Draft7Validator({**schema, "$ref": schema["x-kinds"][kind]})
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayJob": lambda: spec["rayClusterSpec"], "RayService": lambda: spec["rayClusterConfig"],
            "RayCluster": lambda: spec}[doc["kind"]]()


def _groups(doc: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    cs = _cluster_spec(doc)
    return [("head", cs["headGroupSpec"])] + [(g["groupName"], g) for g in cs.get("workerGroupSpecs", [])]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _render_module():
    spec = importlib.util.spec_from_file_location("hiar_infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# ------------------------------------------------------------------------------------------- parsing, schema


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_under_infra_parses(path):
    assert _docs(path), f"{path} holds no YAML document"


def test_the_yaml_files_expected_exist():
    for p in [RAYJOB, RAYSERVICE, RAYCLUSTER, TEMPLATE, MLFLOW_K8S, COMPOSE, LAUNCHER, EXAMPLE_SERVE_CONFIG]:
        assert p in YAML_FILES


def test_schema_subset_is_a_valid_json_schema():
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert {"RayJob", "RayService", "RayCluster"} <= set(schema["x-kinds"])
    assert schema["definitions"]["WorkerGroupSpec"]["required"] == [
        "groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"]


@pytest.mark.parametrize("path", KUBE_MANIFESTS + [TEMPLATE], ids=lambda p: str(p.relative_to(ROOT)))
def test_kubernetes_manifests_validate_against_the_schema_subset(path):
    for doc in _docs(path):
        assert _schema_errors(doc) == [], f"{path.name} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


@pytest.mark.parametrize("mutation, expected", [
    (lambda d: d["spec"]["rayClusterSpec"].__setitem__("workerGroupSpec", []), "workerGroupSpec"),
    (lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"), "headGroupSpec"),
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True), "shutdownAfterJobFinish"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"), "maxReplicas"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "string"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .__setitem__("envv", []), "envv"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
     .append({"value": "x"}), "name"),
    (lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"), "ray.io/v1"),
])
def test_schema_subset_rejects_typical_mistakes(mutation, expected):
    doc = copy.deepcopy(_one(RAYJOB))
    mutation(doc)
    errors = _schema_errors(doc)
    assert errors and any(expected in e for e in errors), errors


# ------------------------------------------------------------------------------------------------- secrets


def test_no_literal_secrets_anywhere_under_infra():
    problems = []
    for path in YAML_FILES:
        for doc in _docs(path):
            if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                problems.append(f"{path.name}: a Secret with values")
            for node in _walk(doc):
                # Kubernetes EnvVar: a secret-like name must come from a Secret (secretKeyRef), never `value`.
                if isinstance(node, dict) and isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) \
                        and ("value" in node or "valueFrom" in node):
                    if "value" in node or "secretKeyRef" not in node.get("valueFrom", {}):
                        problems.append(f"{path.name}: env {node['name']} is not a secretKeyRef")
    # docker-compose: secret-like variables only through ${...} interpolation (or passed through unset).
    for name, svc in yaml.safe_load(COMPOSE.read_text())["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key) and value is not None and not re.fullmatch(r"\$\{[^}]+\}", str(value)):
                problems.append(f"docker-compose {name}: {key} is a literal")
    # Raw text of every file: AWS key ids, long secret-looking assignments, passwords inside database URIs.
    patterns = {
        "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
        "secret assignment": re.compile(r"(?i)(secret|password|token)[\w-]*\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}"),
        "password in a URI": re.compile(r"\w+://[^:/\s@$]+:(?![$])[^@\s]+@"),
    }
    for path in INFRA.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            text = path.read_text(errors="replace")
            for what, pattern in patterns.items():
                for m in pattern.finditer(text):
                    problems.append(f"{path.relative_to(ROOT)}: {what}: {m.group(0)[:60]}")
    assert problems == []


def test_ray_pods_share_image_environment_and_secret_refs():
    for path in [RAYJOB, RAYSERVICE, RAYCLUSTER]:
        doc = _one(path)
        for group, spec in _groups(doc):
            for c in spec["template"]["spec"]["containers"]:
                where = f"{path.name}:{group}:{c['name']}"
                assert c["image"] == "hiar:latest", where
                env = _env(c)
                assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0", where
                assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true", where
                assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000", where
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    ref = env[key]["valueFrom"]["secretKeyRef"]
                    assert (ref["name"], ref["key"]) == ("hiar-s3", key), where
                    assert not ref.get("optional"), where
            assert _cluster_spec(doc)["rayVersion"] == "2.60.0"


def test_mlflow_service_is_where_the_ray_pods_look_for_it():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(MLFLOW_K8S)}
    svc = docs[("Service", "mlflow")]
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]  # http://mlflow:5000
    for kind, name in [("Deployment", "mlflow"), ("StatefulSet", "mlflow-postgres")]:
        workload = docs[(kind, name)]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc_name = name if kind == "Deployment" else workload["spec"]["serviceName"]
        assert docs[("Service", svc_name)]["spec"]["selector"].items() <= labels.items()
    (container,) = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"]
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"] and "--host=0.0.0.0" in args and "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    uri = next(a for a in args if a.startswith("--backend-store-uri="))
    assert uri.startswith("--backend-store-uri=postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@")
    env = _env(container)
    assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD"} <= env.keys()  # referenced as $(VAR): must be defined


def test_docker_compose_has_the_same_shape():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "mlflow"} <= services.keys()
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
    mlflow = services["mlflow"]
    cmd = mlflow["command"]
    assert cmd[0] == "server" and "--serve-artifacts" in cmd
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in cmd)
    assert any(a.startswith("--artifacts-destination=") for a in cmd)
    assert mlflow["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert all(str(p).startswith("127.0.0.1:") for p in mlflow["ports"])
    assert (COMPOSE.parent / mlflow["build"]["context"] / "Dockerfile").exists()


# ------------------------------------------------------------------------------------------------- RayJob


def _entrypoint_argv() -> list[str]:
    return shlex.split(_one(RAYJOB)["spec"]["entrypoint"])


def test_rayjob_runs_the_platform_entrypoint_with_valid_overrides():
    doc = _one(RAYJOB)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # working_dir upload needs the submitter pod
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/hiar"
    argv = _entrypoint_argv()
    assert argv[:3] == ["python", "-m", "hiar.pipeline.full"]
    assert argv[argv.index("--preset") + 1] == "wan2.1-1.3b"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert any(o.startswith("data.storage=s3://") for o in overrides)
    from hiar.config import load_config

    cfg = load_config("wan2.1-1.3b", overrides)  # unknown sections/fields or bad values raise here
    assert cfg.data.storage.startswith("s3://")
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * g.get("replicas", 0) for _, g in _groups(doc)[1:])
    assert gpus >= max(cfg.distill.num_workers if cfg.distill.use_gpu else 0, 1)
    assert gpus >= cfg.data.actors * cfg.data.gpus_per_actor


def test_rayjob_entrypoint_module_exists():
    import importlib.util

    assert importlib.util.find_spec(_entrypoint_argv()[2]) is not None


def test_rayjob_run_dir_is_a_volume_shared_by_the_head_and_every_worker():
    """Rank 0 of a training job (on a worker) writes the bundle the driver (on the head) reads next, and the
    run directory must outlive the cluster for a re-applied RayJob to skip finished stages."""
    argv = _entrypoint_argv()
    run_dir = argv[argv.index("--run-dir") + 1]
    for name, group in _groups(_one(RAYJOB)):
        spec = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = [m for m in spec["containers"][0].get("volumeMounts", [])
                  if m["name"] in claims and run_dir.startswith(m["mountPath"].rstrip("/") + "/")
                  and not m.get("readOnly")]
        assert mounts, f"{name}: no writable volume holds {run_dir}"


# --------------------------------------------------------------------------------------------- RayService


def _resources_param(group: dict) -> dict:
    """rayStartParams.resources: KubeRay's quoted-JSON string, e.g. '"{\\"hiar_step1\\": 1}"'."""
    raw = group["rayStartParams"].get("resources")
    if raw is None:
        return {}
    value = json.loads(raw)
    return json.loads(value) if isinstance(value, str) else value


def test_rayservice_has_one_gpu_group_per_denoising_stage_and_a_cpu_group():
    doc = _one(RAYSERVICE)
    groups = dict(_groups(doc))
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"  # no Serve replica next to the controller
    assert "cpu" in groups
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for n in range(1, 5):
        g = groups[f"step{n}-gpu"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert _resources_param(g) == {f"hiar_step{n}": 1}
    assert len(groups) == 6


def _embedded_serve_config() -> dict:
    return yaml.safe_load(_one(RAYSERVICE)["spec"]["serveConfigV2"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic v2 notices from inside ray.serve
def test_rayservice_serve_config_is_a_valid_serve_config_whose_stages_land_on_their_groups():
    from ray.serve.schema import ServeDeploySchema

    config = _embedded_serve_config()
    ServeDeploySchema.model_validate(config)
    doc = _one(RAYSERVICE)
    advertised, gpus = {}, 0
    for _, g in _groups(doc)[1:]:
        for k, v in _resources_param(g).items():
            advertised[k] = advertised.get(k, 0) + v * g["replicas"]
        gpus += int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) \
            * g["replicas"]
    wanted_gpus = 0
    deployments = {}
    for app in config["applications"]:
        for d in app.get("deployments", []):
            deployments[d["name"]] = d
            opts = d.get("ray_actor_options") or {}
            replicas = d.get("num_replicas", 1)
            replicas = replicas if isinstance(replicas, int) else 1
            wanted_gpus += opts.get("num_gpus", 0) * replicas
            for k, v in (opts.get("resources") or {}).items():
                assert advertised.get(k, 0) >= v * replicas, f"{d['name']} asks for {k} that no group offers"
    assert wanted_gpus <= gpus
    assert {"Ingress", "Decoder"} <= deployments.keys()
    for n in range(1, 5):
        assert f"Step{n}" in deployments, f"the serve config must configure deployment Step{n}"
        opts = deployments[f"Step{n}"].get("ray_actor_options") or {}
        assert opts.get("num_gpus") == 1 and opts.get("resources") == {f"hiar_step{n}": 1}, (
            f"Step{n} must ask for num_gpus: 1 and resources: {{hiar_step{n}: 1}} to land on group step{n}-gpu")
    for name in ("Ingress", "Decoder"):
        assert not (deployments[name].get("ray_actor_options") or {}).get("num_gpus"), name
    # The stages move their model to the GPU only when the app's own config says so (serve.stage_num_gpus).
    from hiar.config import load_config

    for app in config["applications"]:
        if app.get("import_path") == "hiar.serving.app:build_app":
            args = app.get("args") or {}
            overrides = args.get("overrides") or []
            cfg = load_config(args.get("preset", "tiny"), [overrides] if isinstance(overrides, str) else overrides)
            assert cfg.serve.stage_num_gpus > 0, "args.overrides must set serve.stage_num_gpus=1 for GPU stages"


def test_rayservice_embeds_serving_serve_config():
    if not SERVE_CONFIG.exists():
        pytest.skip("hiar/serving/serve_config.yaml does not exist yet (serving/ is another engineer's work); "
                    "infra/kuberay/rayservice.yaml is rendered from infra/_testdata/serve_config.example.yaml "
                    "until then: run `python infra/render.py` once it exists")
    assert _embedded_serve_config() == yaml.safe_load(SERVE_CONFIG.read_text()), \
        "infra/kuberay/rayservice.yaml is stale: run `python infra/render.py`"


def test_rayservice_is_exactly_what_render_py_writes():
    render = _render_module()
    committed = RAYSERVICE.read_text()
    source = re.match(r"# GENERATED by infra/render.py from \S+ and (\S+):", committed).group(1)
    serve_path = ROOT / source
    assert serve_path in (SERVE_CONFIG, EXAMPLE_SERVE_CONFIG), source
    assert render.render(TEMPLATE.read_text(), serve_path.read_text(), source) == committed, \
        "infra/kuberay/rayservice.yaml is stale: run `python infra/render.py`"


def test_render_py_cli(tmp_path):
    out = tmp_path / "rs.yaml"
    cmd = [sys.executable, str(INFRA / "render.py"), "--serve-config", str(EXAMPLE_SERVE_CONFIG), "--out", str(out)]
    assert subprocess.run(cmd + ["--check"], capture_output=True).returncode == 1  # nothing there yet
    subprocess.run(cmd, check=True, capture_output=True)
    assert subprocess.run(cmd + ["--check"], capture_output=True).returncode == 0
    doc = _one(out)
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == yaml.safe_load(EXAMPLE_SERVE_CONFIG.read_text())
    missing = subprocess.run([sys.executable, str(INFRA / "render.py"), "--serve-config", str(tmp_path / "no.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize("text", [
    "applications:\n- name: a\n  import_path: m:f\n",
    "  applications:\n  - name: a\n    import_path: m:f\n",            # first line indented: no plain `|`
    "# c\n\napplications:\n\n- name: a   \n  import_path: m:f\n\n\n",  # blank lines, trailing spaces
])
def test_render_embeds_any_serve_config_verbatim(text):
    out = _render_module().render(TEMPLATE.read_text(), text, "x.yaml")
    assert yaml.safe_load(out)["spec"]["serveConfigV2"] == text.rstrip("\n") + "\n"
    assert "@@SERVE_CONFIG@@" not in out and "\n##" not in out


def test_render_rejects_a_file_that_is_not_a_serve_config():
    with pytest.raises(ValueError, match="applications"):
        _render_module().render(TEMPLATE.read_text(), "foo: 1\n", "x.yaml")


# ------------------------------------------------------------------------------------------ cluster launcher


def test_cluster_launcher_config_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before any cloud call

    bad = copy.deepcopy(config)
    bad["setup_command"] = bad.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)

    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["auth"]["ssh_user"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types and not types[config["head_node_type"]]["resources"].get("GPU")
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    setup = "\n".join(config["setup_commands"])
    assert setup.index("torch==2.13.0") < setup.index("pip install --no-cache-dir /tmp/hiar-src")
    assert "~/hiar" in config["file_mounts"]
    run_options = " ".join(config["docker"]["run_options"])
    assert "RAY_USAGE_STATS_ENABLED=0" in run_options and "MLFLOW_DISABLE_TELEMETRY=true" in run_options
    assert config["docker"]["worker_image"].startswith("rayproject/ray:2.60.0-py311")


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_from_ray_2_60_and_installs_torch_first():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f)
             for f in re.findall(r"^FROM (\S+)", text, re.MULTILINE)]
    assert "rayproject/ray:2.60.0-py311" in froms and "rayproject/ray:2.60.0-py311-gpu" in froms
    assert args["TORCH_VERSION"] == "2.13.0" and args["VARIANT"] == "cpu"
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("pip install --no-cache-dir .")
    for var in ("RAY_USAGE_STATS_ENABLED=0", "MLFLOW_DISABLE_TELEMETRY=true"):
        assert var in text
    assert "PYTHONPATH" not in text  # the package is installed: nothing is imported from a source tree
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for item in src.split():
            assert (ROOT / item).exists(), f"COPY source {item} missing"


# ------------------------------------------------------------------------------------- local MLflow server


def test_start_local_sh_syntax():
    subprocess.run(["bash", "-n", str(START_LOCAL)], check=True)
    assert os.access(START_LOCAL, os.X_OK)


def _session_processes(sid: int) -> list[str]:
    """Live (non-zombie) processes of session ``sid``, as 'pid cmdline'."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{d.name} {cmdline[:120]}")
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_start_local_serves_runs_and_proxies_artifacts_to_s3_and_stops_cleanly(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tests.services import free_port

    mlflow_port, s3_port, bucket = free_port(), free_port(), "hiar-infra-test"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING", "MLFLOW_S3"))}
    env.update(PYTHON=sys.executable, MLFLOW_PORT=str(mlflow_port), S3_PORT=str(s3_port), MLFLOW_BUCKET=bucket,
               MLFLOW_STATE_DIR=str(tmp_path / "state"))
    log = tmp_path / "start_local.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(START_LOCAL)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: "export MLFLOW_TRACKING_URI=" in log.read_text() or proc.poll() is not None, 240)
        text = log.read_text()
        assert proc.poll() is None, text
        uri = re.search(r"^export MLFLOW_TRACKING_URI=(\S+)$", text, re.MULTILINE).group(1)
        assert uri == f"http://127.0.0.1:{mlflow_port}"

        # The client has no S3 credentials or endpoint: artifacts must go through the server's proxy.
        for var in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_S3"))] + ["MLFLOW_TRACKING_URI"]:
            monkeypatch.delenv(var, raising=False)
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment("infra-start-local"))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        client.log_param(run.info.run_id, "stage", "infra-test")
        client.log_metric(run.info.run_id, "loss", 0.5)
        src = tmp_path / "note.txt"
        src.write_text("hiar infra artifact\n")
        client.log_artifact(run.info.run_id, str(src))
        back = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(back).read_text() == "hiar infra artifact\n"
        got = client.get_run(run.info.run_id)
        assert got.data.params == {"stage": "infra-test"} and got.data.metrics == {"loss": 0.5}

        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.startswith("artifacts/") and k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys)
        assert (tmp_path / "state" / "mlflow.db").exists()  # SQLite backend store

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        assert wait_for(lambda: not _session_processes(proc.pid), 15), _session_processes(proc.pid)
        for port in (mlflow_port, s3_port):
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in _session_processes(proc.pid):  # only what this test started (its own session)
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
