"""The deployment files under infra/ are parseable, complete and consistent with each other and the code.

Nothing here needs Docker or a cluster: the files are parsed, the Prefect work-pool templates are
checked and rendered with Prefect's own templating, and the commands the manifests run are parsed
with the real `dinoflow` and `torchrun` argument parsers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "kubernetes"
COMPOSE_FILE = INFRA / "compose" / "docker-compose.yaml"
POOLS = K8S / "work-pools"
DOCKER = INFRA / "docker"
IMAGES = json.loads((INFRA / "images.json").read_text())
OUR_IMAGES = {entry["image"]: entry for entry in IMAGES["dinoflow"].values()}
ALL_IMAGES = set(OUR_IMAGES) | set(IMAGES["third_party"].values())
WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet", "TrainJob"}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|AUTH_STRING|CREDENTIAL)", re.IGNORECASE)


def config_files() -> list[Path]:
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    files += [p for p in (REPO / "prefect.yaml", REPO / "dvc.yaml") if p.is_file()]
    files += sorted((REPO / "params").rglob("*.yaml"))
    return files


def load_documents(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_documents(path)]


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The main containers of a workload manifest (a TrainJob has one trainer spec)."""
    if doc["kind"] == "TrainJob":
        return [doc["spec"]["trainer"]]
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key path, leaf value) of a parsed YAML/JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")
    else:
        yield path, node


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def pool_template(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((POOLS / name).read_text())
    return loaded


def constraint_version(package: str) -> str:
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} not pinned in infra/constraints.txt")


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_config_file_parses(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents), f"{path}: every document must be a mapping"


def test_the_expected_infra_files_exist() -> None:
    for relative in ("docker/Dockerfile.train", "docker/Dockerfile.flow", "docker/Dockerfile.mlflow",
                     "compose/docker-compose.yaml", "kubernetes/base.yaml", "kubernetes/pretrain-multinode.yaml",
                     "kubernetes/pretrain-trainjob.yaml", "kubernetes/prefect-workers.yaml",
                     "kubernetes/work-pools/kubernetes-cpu.json", "kubernetes/work-pools/kubernetes-gpu.json",
                     "README.md"):
        assert (INFRA / relative).is_file(), relative


# ----------------------------------------------------------------------------- images


def test_images_file_names_existing_dockerfiles() -> None:
    for role, entry in IMAGES["dinoflow"].items():
        assert (REPO / entry["dockerfile"]).is_file(), role
        assert re.fullmatch(r"[a-z0-9./-]+/dinoflow-[a-z]+:[\w.-]+", entry["image"]), entry["image"]


def test_every_image_used_is_defined_in_images_json_and_every_own_image_is_used() -> None:
    used: dict[str, str] = {}
    for path, doc in k8s_documents():
        if doc["kind"] in WORKLOAD_KINDS:
            for container in pod_containers(doc):
                used[container["image"]] = f"{path.name}:{doc['metadata']['name']}"
    for name, service in compose()["services"].items():
        used[service["image"]] = f"compose:{name}"
    for pool in POOLS.glob("*.json"):
        used[pool_template(pool.name)["variables"]["properties"]["image"]["default"]] = pool.name
    undefined = {image: where for image, where in used.items() if image not in ALL_IMAGES}
    assert not undefined, f"images not defined in infra/images.json: {undefined}"
    assert set(OUR_IMAGES) <= set(used), f"defined but unused: {set(OUR_IMAGES) - set(used)}"


def test_pinned_tool_versions_match_the_constraints() -> None:
    for package, version in IMAGES["pinned_versions"].items():
        assert constraint_version(package) == version, package
    prefect_tag = IMAGES["third_party"]["prefect_server"].rsplit(":", 1)[1]
    assert prefect_tag.startswith(constraint_version("prefect") + "-"), "Prefect server and clients must agree"
    mlflow_arg = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", (DOCKER / "Dockerfile.mlflow").read_text(), re.MULTILINE)
    assert mlflow_arg and mlflow_arg.group(1) == constraint_version("mlflow")


# ----------------------------------------------------------------------------- Dockerfiles


def dockerfile_copies(dockerfile: Path) -> list[str]:
    sources: list[str] = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


def dockerignore_keeps(dockerfile: Path, source: str) -> bool:
    """Whether the per-Dockerfile ignore file (`*` then `!path` lines) lets ``source`` into the context."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.is_file():
        return True
    kept = [line[1:] for line in ignore.read_text().splitlines() if line.startswith("!")]
    return any(source == keep or source.startswith(keep.rstrip("/") + "/") for keep in kept)


DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files_through_its_ignore_file_and_uses_constraints(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    sources = dockerfile_copies(dockerfile)
    assert sources, "an image of ours copies something from the repository"
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
        assert dockerignore_keeps(dockerfile, source), f"{dockerfile.name}: {source} is excluded from the context"
    assert "infra/constraints.txt" in sources, "installs must be pinned by infra/constraints.txt"
    assert re.search(r"pip install -c \S*constraints\.txt", text), "pip must install with the constraints"
    assert re.search(r"^FROM \S+", text, re.MULTILINE)


def test_train_image_builds_xformers_only_on_request_against_the_base_torch() -> None:
    text = (DOCKER / "Dockerfile.train").read_text()
    assert re.search(r'^ARG XFORMERS_VERSION=""$', text, re.MULTILINE)
    assert "--no-build-isolation" in text and "--no-binary xformers" in text
    assert re.search(r"^ARG BASE_IMAGE=\S*cuda\S*-devel$", text, re.MULTILINE), "nvcc is needed for xformers"


# ----------------------------------------------------------------------------- compose


def test_compose_services_are_complete_and_reference_what_exists() -> None:
    stack = compose()
    services, secrets = stack["services"], stack["secrets"]
    assert {"prefect-server", "prefect-db", "mlflow-server", "mlflow-db", "s3"} <= set(services)
    for name, service in services.items():
        assert service.get("image"), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for secret in service.get("secrets", []):
            assert secret in secrets, f"{name} uses undeclared secret {secret}"
        build = service.get("build")
        if build:
            assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).is_file(), name
    mlflow_command = " ".join(services["mlflow-server"]["command"])
    assert "--artifacts-destination s3://" in mlflow_command and "postgresql://" in mlflow_command
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"


def test_compose_has_no_literal_secrets() -> None:
    text = COMPOSE_FILE.read_text()
    offenders = []
    for path, value in walk(compose()):
        if path.startswith("secrets.") or re.search(r"\.secrets\[\d+\]$", path):
            continue  # names of docker secrets, not values
        key = path.rsplit(".", 1)[-1]
        literal = isinstance(value, str) and not re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", value)
        if SECRET_NAME.search(key) and not key.endswith("_FILE") and literal:
            offenders.append(f"{path}={value}")
        if key.endswith("_FILE"):
            assert str(value).startswith("/run/secrets/"), path
    # Connection strings must take their password from a secret file at run time, never inline.
    passwords = re.findall(r"postgresql(?:\+\w+)?://\w+:(.*?)@", text)
    assert passwords, "the MLflow backend store is PostgreSQL"
    for password in passwords:
        assert password.startswith("$$(cat /run/secrets/"), password
    for declared in compose()["secrets"].values():
        assert set(declared) == {"file"} and declared["file"].startswith("${DINOFLOW_SECRETS_DIR"), declared
    assert not offenders, offenders


def test_make_secrets_writes_every_secret_compose_declares(tmp_path: Path) -> None:
    env = {**os.environ, "DINOFLOW_SECRETS_DIR": str(tmp_path / "secrets")}
    first = subprocess.run(["bash", str(INFRA / "compose" / "make-secrets.sh")], env=env, capture_output=True,
                           text=True, check=True, timeout=60)
    written = {p.name: p.read_text().strip() for p in (tmp_path / "secrets").iterdir()}
    assert set(written) == set(compose()["secrets"]), first.stdout
    # Prefect's auth string is `user:password`; every other secret is one URL-safe token.
    assert re.fullmatch(r"dinoflow:[\w-]{24,}", written["prefect_api_auth_string"])
    assert all(len(value) >= 24 and re.fullmatch(r"(dinoflow:)?[\w-]+", value) for value in written.values())
    assert not any(value in first.stdout + first.stderr for value in written.values()), "never printed"
    assert len(set(written.values())) == len(written), "every secret is drawn independently"
    subprocess.run(["bash", str(INFRA / "compose" / "make-secrets.sh")], env=env, check=True, timeout=60)
    assert {p.name: p.read_text().strip() for p in (tmp_path / "secrets").iterdir()} == written, "never rotated"


def test_bucket_script_is_valid_python() -> None:
    compile((INFRA / "compose" / "create_buckets.py").read_text(), "create_buckets.py", "exec")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` interpolation (the forms this file uses)."""
    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")
    return re.sub(r"\$\{([A-Z0-9_]+)(:-([^}]*))?\}", one, value)


def test_every_published_port_binds_to_loopback_unless_the_bind_variable_says_otherwise() -> None:
    published = {name: service["ports"] for name, service in compose()["services"].items() if service.get("ports")}
    assert {"prefect-server", "mlflow-server", "s3"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith("${DINOFLOW_BIND_ADDRESS:-127.0.0.1}:"), (name, port)
            assert interpolate(port, {}).startswith("127.0.0.1:"), (name, port)
            host, published_port, container_port = interpolate(port, {"DINOFLOW_BIND_ADDRESS": "0.0.0.0"}).split(":")
            assert host == "0.0.0.0" and published_port.isdigit() and container_port.isdigit(), (name, port)
    assert "DINOFLOW_BIND_ADDRESS" in (REPO / "docs" / "deployment.md").read_text(), "the variable is documented"


def exported_secrets(service: dict[str, Any]) -> dict[str, str]:
    """VAR -> secret name for each ``VAR="$$(cat /run/secrets/NAME)"`` the service's shell wrapper exports."""
    command = " ".join(service.get("command") or [])
    return dict(re.findall(r'(\w+)="\$\$\(cat /run/secrets/(\w+)\)"', command))


def test_prefect_and_mlflow_require_authentication_and_their_clients_send_it() -> None:
    services = compose()["services"]
    prefect, mlflow_server, worker = services["prefect-server"], services["mlflow-server"], services["prefect-worker"]
    # Prefect: the server checks an auth string from a secret; health probes stay unauthenticated.
    assert exported_secrets(prefect)["PREFECT_SERVER_API_AUTH_STRING"] == "prefect_api_auth_string"
    assert "prefect_api_auth_string" in prefect["secrets"]
    assert prefect["healthcheck"]["test"][-1].endswith("urlopen('http://localhost:4200/api/health')")
    # MLflow: the basic-auth app, configured from secrets by the script the image ships.
    command = " ".join(mlflow_server["command"])
    assert "exec mlflow server --app-name basic-auth " in command
    assert "python /usr/local/bin/mlflow_auth_config.py" in command
    assert exported_secrets(mlflow_server)["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "mlflow_flask_secret_key"
    assert mlflow_server["environment"]["MLFLOW_AUTH_CONFIG_PATH"].startswith("/tmp/")
    assert {"mlflow_admin_password", "mlflow_db_password"} <= set(mlflow_server["secrets"])
    assert mlflow_server["healthcheck"]["test"][-1].endswith("urlopen('http://localhost:5000/health')")
    dockerfile = (DOCKER / "Dockerfile.mlflow").read_text()
    assert "COPY infra/compose/mlflow_auth_config.py /usr/local/bin/mlflow_auth_config.py" in dockerfile
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile, "the auth app needs Flask-WTF"
    constraint_version("flask-wtf")
    # The worker (and the flow runs it starts, which inherit its environment) authenticates to both.
    assert exported_secrets(worker) == {"AWS_ACCESS_KEY_ID": "s3_access_key", "AWS_SECRET_ACCESS_KEY": "s3_secret_key",
                                        "PREFECT_API_AUTH_STRING": "prefect_api_auth_string",
                                        "MLFLOW_TRACKING_PASSWORD": "mlflow_admin_password"}
    assert worker["environment"]["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_ADMIN_USERNAME:-dinoflow}"
    assert mlflow_server["environment"]["MLFLOW_ADMIN_USERNAME"] == "${MLFLOW_ADMIN_USERNAME:-dinoflow}"
    for name, service in services.items():
        for variable, secret in exported_secrets(service).items():
            assert secret in service["secrets"], f"{name} exports {variable} from unmounted secret {secret}"


def test_mlflow_auth_config_script_writes_a_private_config_mlflow_reads(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "mlflow_admin_password").write_text("pass%word-with-percent\n")
    out = tmp_path / "conf" / "basic_auth.ini"
    env = {**os.environ, "SECRETS_DIR": str(secrets), "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'a.db'}",
           "MLFLOW_ADMIN_USERNAME": "ops"}
    done = subprocess.run([sys.executable, str(INFRA / "compose" / "mlflow_auth_config.py"), str(out)], env=env,
                          capture_output=True, text=True, check=True, timeout=60)
    assert "pass%word" not in done.stdout + done.stderr
    assert out.stat().st_mode & 0o777 == 0o600 and out.parent.stat().st_mode & 0o777 == 0o700
    read = subprocess.run(
        [sys.executable, "-c", "import json; from mlflow.server.auth.config import read_auth_config as r; "
         "print(json.dumps(r()._asdict()))"],
        env={**env, "MLFLOW_AUTH_CONFIG_PATH": str(out)}, capture_output=True, text=True, check=True, timeout=120)
    config = json.loads(read.stdout.strip().splitlines()[-1])
    assert (config["admin_username"], config["admin_password"]) == ("ops", "pass%word-with-percent")
    assert config["database_uri"] == f"sqlite:///{tmp_path / 'a.db'}" and config["default_permission"] == "READ"
    assert config["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    (secrets / "mlflow_admin_password").write_text("short")
    refused = subprocess.run([sys.executable, str(INFRA / "compose" / "mlflow_auth_config.py"), str(out)], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "12 characters" in refused.stderr


# ----------------------------------------------------------------------------- Kubernetes manifests


def test_kubernetes_manifests_have_identity_and_runnable_containers() -> None:
    kinds = set()
    for path, doc in k8s_documents():
        where = f"{path.name}:{doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        assert doc.get("metadata", {}).get("name"), where
        kinds.add(doc["kind"])
        if doc["kind"] in WORKLOAD_KINDS:
            for container in pod_containers(doc):
                assert container.get("image") and container.get("command"), where
    assert {"Job", "Service", "Deployment", "TrainJob", "ConfigMap"} <= kinds


def test_secret_environment_comes_from_secret_key_refs() -> None:
    for path, doc in k8s_documents():
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        for container in pod_containers(doc):
            for variable in container.get("env", []):
                if SECRET_NAME.search(variable["name"]):
                    assert "value" not in variable, f"{path.name}: {variable['name']} is a literal"
                    assert variable["valueFrom"]["secretKeyRef"]["name"], variable
    for name in ("kubernetes-cpu.json", "kubernetes-gpu.json"):
        manifest = pool_template(name)["job_configuration"]["job_manifest"]
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        assert {v["name"] for v in container["env"] if "secretKeyRef" in v["valueFrom"]} >= {
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def multinode() -> dict[str, dict[str, Any]]:
    docs = load_documents(K8S / "pretrain-multinode.yaml")
    return {doc["kind"]: doc for doc in docs}


def expand(command: str, env: dict[str, str]) -> list[str]:
    """What `sh -c` runs: ${VAR} expanded from the container env, split into words, `exec` dropped."""
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command)
    words = shlex.split(expanded)
    return words[1:] if words[0] == "exec" else words


def test_multinode_job_rendezvous_is_consistent_with_its_service() -> None:
    docs = multinode()
    job, service = docs["Job"], docs["Service"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["NNODES"])
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert env["RDZV_HOST"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["NPROC_PER_NODE"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "JOB_COMPLETION_INDEX" in container["command"][-1]


def test_multinode_command_parses_with_torchrun_and_the_dinoflow_cli() -> None:
    from torch.distributed.run import get_args_parser

    from flows.cli import build_parser

    container = multinode()["Job"]["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    assert container["command"][:2] == ["/bin/sh", "-c"]
    words = expand(container["command"][2], {**env, "JOB_COMPLETION_INDEX": "1"})
    assert words[0] == "torchrun"
    launch = get_args_parser().parse_args(words[1:])
    assert (launch.nnodes, launch.nproc_per_node, launch.node_rank) == (env["NNODES"], env["NPROC_PER_NODE"], 1)
    assert launch.rdzv_backend == "static" and launch.rdzv_endpoint == f"{env['RDZV_HOST']}:29500"
    assert launch.module and launch.training_script == "flows.cli"
    args = build_parser().parse_args(launch.training_script_args)
    assert (args.command, args.engine, args.params) == ("pretrain", "local", "/config/pretrain.yaml")
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(args.params).parent) in mounted


def test_trainjob_runs_the_same_entry_point_and_params() -> None:
    from torch.distributed.run import get_args_parser

    from flows.cli import build_parser

    (trainjob,) = load_documents(K8S / "pretrain-trainjob.yaml")
    trainer = trainjob["spec"]["trainer"]
    launch = get_args_parser().parse_args(trainer["command"][1:])
    args = build_parser().parse_args(launch.training_script_args)
    assert trainer["command"][0] == "torchrun" and launch.training_script == "flows.cli"
    assert (args.command, args.engine) == ("pretrain", "local")
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    override = trainjob["spec"]["podSpecOverrides"][0]
    assert {v["name"]: v for v in override["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
    params = {v["configMap"]["name"] for v in override["volumes"] if "configMap" in v}
    assert params == {multinode()["ConfigMap"]["metadata"]["name"]}


def test_multinode_params_load_as_a_valid_pretrain_config(tmp_path: Path) -> None:
    from components.train.config import load_pretrain_config

    params = tmp_path / "pretrain.yaml"
    params.write_text(multinode()["ConfigMap"]["data"]["pretrain.yaml"])
    cfg = load_pretrain_config(params)  # unknown keys or bad values raise ConfigError
    assert cfg.run.device == "cuda" and cfg.parallel.strategy == "fsdp" and cfg.objective.precision == "bf16"
    assert cfg.crops.global_crops_size % cfg.backbone.patch_size == 0
    assert cfg.run.output_dir.startswith("/shared/"), "checkpoints must be on the volume every rank sees"
    assert cfg.checkpoint.store_prefix, "checkpoints are mirrored to the object store"


def test_workers_poll_the_pools_the_templates_are_for() -> None:
    workers = [doc for _, doc in k8s_documents() if doc["kind"] == "Deployment"]
    pools = set()
    for worker in workers:
        command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["prefect", "worker", "start"] and command[command.index("--type") + 1] == "kubernetes"
        pools.add(command[command.index("--pool") + 1])
    assert pools == {"cpu-pool", "gpu-pool"}


# ----------------------------------------------------------------------------- Prefect work-pool templates


@pytest.mark.parametrize("name", ["kubernetes-cpu.json", "kubernetes-gpu.json"])
def test_work_pool_template_is_valid_for_prefect_and_renders_a_job(name: str) -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = pool_template(name)
    validate_base_job_template(template)  # every {{ placeholder }} is a declared variable
    properties = template["variables"]["properties"]
    defaults = {key: spec["default"] for key, spec in properties.items() if "default" in spec}
    rendered = apply_values(template["job_configuration"], {**defaults, "name": "flow-run-x",
                                                            "command": "prefect flow-run execute"})
    job = rendered["job_manifest"]
    assert job["kind"] == "Job" and job["metadata"]["generateName"] == "flow-run-x-"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == defaults["image"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1 and volumes[shm[0]["name"]]["emptyDir"] == {"medium": "Memory",
                                                                        "sizeLimit": defaults["shm_size_limit"]}
    assert pod["nodeSelector"] == defaults["node_selector"]
    gpu = name == "kubernetes-gpu.json"
    role = "train" if gpu else "flow"
    assert defaults["image"] == IMAGES["dinoflow"][role]["image"]
    limits = container["resources"]["limits"]
    if gpu:
        assert limits["nvidia.com/gpu"] == defaults["gpu_count"] == container["resources"]["requests"]["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(template)


# ----------------------------------------------------------------------------- prefect.yaml


def test_prefect_deployments_point_at_existing_flows() -> None:
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = project.get("deployments") or []
    assert deployments, "prefect.yaml defines no deployments"
    for deployment in deployments:
        module, function = deployment["entrypoint"].split(":")
        source = REPO / module
        assert source.is_file(), deployment["entrypoint"]
        assert re.search(rf"^def {function}\(", source.read_text(), re.MULTILINE), deployment["entrypoint"]


def test_prefect_deployments_use_the_pools_our_workers_poll_and_the_images_checkout() -> None:
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    polled = set()
    for _, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            command = doc["spec"]["template"]["spec"]["containers"][0]["command"]
            polled.add(command[command.index("--pool") + 1])
    wanted = {deployment["work_pool"]["name"] for deployment in project["deployments"]}
    assert wanted <= polled, f"deployments target pools no worker polls: {wanted - polled}"
    # The pull step changes into $DINOFLOW_CHECKOUT: our flow-run images must define it as their checkout.
    if "DINOFLOW_CHECKOUT" in (REPO / "prefect.yaml").read_text():
        for role in ("train", "flow"):
            text = (REPO / IMAGES["dinoflow"][role]["dockerfile"]).read_text()
            workdir = re.search(r"^WORKDIR (\S+)$", text, re.MULTILINE)
            assert workdir and f"DINOFLOW_CHECKOUT={workdir.group(1)}" in text, role
