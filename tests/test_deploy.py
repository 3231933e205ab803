"""The deployment files as a team would run them: lock, install script, image, cluster configs.

No Ray starts and nothing is pulled. Each manifest is validated against the schema it will meet
(Ray's `ray-schema.json` and botocore's RunInstances model for cluster/aws, KubeRay's CRDs for
cluster/kuberay), each job command is checked with the project's own parser (file exists, flags
parse, the GPUs it asks fit the nodes it may get), and no file holds a secret.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import botocore.session
import botocore.validate
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from resdsn_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
APP = "/app"  # where infra/Dockerfile puts the repository
LAUNCHER = REPO / "cluster" / "aws" / "resdsn.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
MAX_TTL_S = 300  # a finished RayJob's GPU pods must not idle longer
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
CUDA_RUNTIME = re.compile(r"^(nvidia-|cuda-)|^triton$")
JOB_COMMANDS = {"segment_archive.py": "archive", "train.py": "train"}  # jobs/ file -> `resdsn` sub-command


# --------------------------------------------------------------------------- what the repo pins


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@lru_cache(maxsize=1)
def lock_entries() -> list[tuple[Requirement, list[str]]]:
    """requirements.lock as (requirement, hashes), continuation lines joined."""
    text = (REPO / "requirements.lock").read_text().replace("\\\n", " ")
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = line.split(" --hash=")
        entries.append((Requirement(spec), [h.strip() for h in hashes]))
    return entries


def pins() -> dict[str, Version]:
    """The locked version of every package this interpreter would install."""
    out = {}
    for req, _ in lock_entries():
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def ray_version() -> Version:
    return pins()["ray"]


def project_image_tag() -> str:
    return f"resdsn-ray:{pyproject()['project']['version']}"


# --------------------------------------------------------------------------- job commands


def parse_job(command: list[str], app_paths: bool) -> tuple[str, Any]:
    """(`resdsn` sub-command, parsed flags) of one job command; fails unless its file exists and its flags parse."""
    assert command[:1] == ["python"], f"{command}: a job command starts with python"
    script = command[1]
    if app_paths:
        assert script.startswith(f"{APP}/"), f"{script}: KubeRay entrypoints use the image's absolute path"
        script = script[len(APP) + 1:]
    path = REPO / script
    assert path.is_file(), f"{command[1]}: no such file in the repository (the image holds the repo at {APP})"
    sub = JOB_COMMANDS.get(path.name)
    assert sub, f"{command[1]}: not a known job ({sorted(JOB_COMMANDS)})"
    try:
        return sub, build_parser().parse_args([sub, *command[2:]])
    except SystemExit as exc:
        pytest.fail(f"{shlex.join(command)}: the flags do not parse with `resdsn {sub}` (exit {exc.code})")


def job_gpus(command: list[str], app_paths: bool) -> float:
    """GPUs one job command asks at most (its actor pools at their largest, or its DDP workers)."""
    sub, args = parse_job(command, app_paths)
    if sub == "train":
        assert args.gpu, f"{shlex.join(command)}: a GPU cluster's training job passes --gpu"
        return float(args.workers)
    assert args.gpus_per_actor, f"{shlex.join(command)}: says --gpus-per-actor (what the GPU nodes are sized for)"
    assert args.coarse_actors, f"{shlex.join(command)}: says --coarse-actors (the largest pool it may grow to)"
    actors = args.coarse_actors
    if args.shape == "split":
        assert args.fine_actors, f"{shlex.join(command)}: --shape split says --fine-actors"
        actors += args.fine_actors
    return actors * args.gpus_per_actor


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell snippet: continuation lines joined, `&&` lists split."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            commands.append(shlex.split(part))
    return commands


def fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh)?\n(.*?)^```", markdown, flags=re.M | re.S)


def submitted(markdown: str) -> list[tuple[list[str], list[str]]]:
    """(ray job submit options, job command) of every `ray job submit` in the file's code blocks."""
    jobs = []
    for block in fenced_blocks(markdown):
        lines = block.replace("\\\n", " ").splitlines()
        for command in shell_commands("\n".join(line for line in lines if line.lstrip().startswith("ray job submit"))):
            if command[:3] == ["ray", "job", "submit"]:
                assert "--" in command, f"{shlex.join(command)}: the job command follows `--`"
                cut = command.index("--")
                jobs.append((command[3:cut], command[cut + 1:]))
    return jobs


def test_job_gpus_counts_what_the_flags_ask() -> None:
    archive = ["python", "jobs/segment_archive.py", "--input", "s3://a/x", "--output", "s3://a/y",
               "--coarse", "s3://a/c", "--fine", "s3://a/f", "--gpus-per-actor", "0.5"]
    assert job_gpus([*archive, "--shape", "whole", "--coarse-actors", "8"], app_paths=False) == 4
    assert job_gpus([*archive, "--shape", "split", "--coarse-actors", "2", "--fine-actors", "6"], app_paths=False) == 4
    assert job_gpus(["python", "jobs/train.py", "--stage", "fine", "--data", "s3://a/d", "--output", "s3://a/o",
                     "--workers", "3", "--gpu"], app_paths=False) == 3
    with pytest.raises(pytest.fail.Exception, match="do not parse"):
        job_gpus([*archive, "--coarse-actors", "eight"], app_paths=False)
    with pytest.raises(AssertionError, match="no such file"):
        job_gpus(["python", "jobs/segment.py"], app_paths=False)
    with pytest.raises(AssertionError, match="absolute path"):
        job_gpus(["python", "jobs/train.py"], app_paths=True)


# --------------------------------------------------------------------------- lock and install


def test_lock_pins_every_dependency_within_pyproject_ranges() -> None:
    project = pyproject()["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    locked = pins()
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch":
            continue  # installed by pip (infra/install.sh): the build is the installer's choice
        assert name in locked, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), f"lock has {name}=={locked[name]}, pyproject wants {req}"
    assert str(Requirement(next(r for r in project["dependencies"] if r.startswith("ray["))).specifier) == "<2.61,>=2.60"
    assert ray_version().release[:2] == (2, 60), "the lock pins the tested Ray, 2.60.x"


def test_lock_leaves_torch_and_its_cuda_runtime_to_pip_and_hashes_the_rest() -> None:
    for req, hashes in lock_entries():
        name = canonicalize_name(req.name)
        assert name != "torch" and not CUDA_RUNTIME.search(name), f"{name} in the lock: a CPU install would fetch it"
        assert hashes and all(h.startswith("sha256:") for h in hashes), f"{req}: no hashes"


@pytest.mark.parametrize("module", ["ray.data", "nibabel", "pydicom", "resdsn_ray.stages"])
def test_the_install_compiled_the_bytecode(module: str) -> None:
    """Every worker process imports these; without bytecode written at install, a machine with
    PYTHONDONTWRITEBYTECODE (CI's, many images) compiles them from source at every start."""
    origin = importlib.util.find_spec(module).origin
    compiled = Path(importlib.util.cache_from_source(origin))
    assert compiled.exists(), f"{module}: no {compiled.name} beside {origin} (infra/install.sh compiles at install)"


def recipe(makefile: str, target: str) -> str:
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)+)", makefile, flags=re.M)
    assert match, f"Makefile has no recipe for {target}"
    return match.group(1)


def test_make_ci_and_image_run_the_one_install_script() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "infra/install.sh $(VENV)" in recipe(makefile, "$(VENV)/.installed")
    assert recipe(makefile, "test").strip() == "$(BIN)/python -m pytest"  # the README's `make test`
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert "make test" in ci
    assert any("apt-get install" in line and "chromium" in line for line in ci)
    runs = [args for op, args in dockerfile() if op == "RUN"]
    assert any(re.search(r"(^|\s)infra/install\.sh /home/ray/anaconda3$", args) for args in runs)
    script = (REPO / "infra" / "install.sh").read_text()
    assert '--require-hashes -r "$repo/requirements.lock"' in script
    assert '--no-deps -e "$repo"' in script
    # the same torch for the venv and the image; only the wheel's build differs
    make_torch = re.search(r"^TORCH \?= (\S+)$", makefile, flags=re.M).group(1)
    image_torch = re.search(r'^ARG TORCH="(\S+)"$', (REPO / "infra" / "Dockerfile").read_text(), flags=re.M).group(1)
    assert make_torch == image_torch
    torch = Requirement(make_torch)
    wanted = next(Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert wanted.specifier.contains(next(iter(torch.specifier)).version)


# --------------------------------------------------------------------------- image


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of infra/Dockerfile, continuation lines joined."""
    text = (REPO / "infra" / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), " ".join(args.split())))
    return out


def test_image_is_rays_gpu_image_of_the_pinned_ray_and_a_supported_python() -> None:
    (base,) = [args for op, args in dockerfile() if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cu\d+)", base)
    assert match, f"{base}: not a rayproject/ray GPU tag ({{version}}-py3X-gpu|cuXYZ)"
    assert Version(match.group(1)) == ray_version(), f"{base} is not the Ray the lock pins ({ray_version()})"
    python = Version(f"3.{match.group(2)}")
    assert Requirement(f"python{pyproject()['project']['requires-python']}").specifier.contains(python)


def test_image_copies_what_exists_and_what_the_context_lets_through() -> None:
    steps = dockerfile()
    assert ("WORKDIR", APP) in steps
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    assert allowed[allowed.index("*") if "*" in allowed else 0] == "*", ".dockerignore starts by excluding everything"
    sources = []
    for op, args in steps:
        if op == "COPY":
            *srcs, _dest = [word for word in args.split() if not word.startswith("--")]
            sources += srcs
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert f"!{src.rstrip('/')}" in allowed, f"COPY {src}: .dockerignore keeps it out of the build context"
    assert {"jobs", "resdsn_ray", "requirements.lock", "infra/install.sh"} <= set(sources)
    assert "bundles/**/*" in pyproject()["tool"]["setuptools"]["package-data"]["resdsn_ray"]
    assert (REPO / "resdsn_ray" / "bundles" / "demo-coarse").is_dir() and (REPO / "resdsn_ray" / "bundles" / "demo-fine").is_dir()


# --------------------------------------------------------------------------- cluster launcher


def ray_schema() -> dict[str, Any]:
    """The launcher's schema as shipped in the installed ray package (read without importing Ray)."""
    (root,) = importlib.util.find_spec("ray").submodule_search_locations
    return json.loads((Path(root) / "autoscaler" / "ray-schema.json").read_text())


def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def run_instances_errors(node_config: dict[str, Any]) -> str:
    """What boto3 would refuse in the EC2 RunInstances call Ray makes with this node config."""
    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    return botocore.validate.ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape).generate_report()


def test_launcher_config_matches_rays_schema_and_ec2s_api() -> None:
    config = launcher()
    jsonschema.Draft7Validator(ray_schema()).validate(config)
    for name, node_type in config["available_node_types"].items():
        assert not run_instances_errors(node_type["node_config"]), f"{name}: {run_instances_errors(node_type['node_config'])}"


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(idle_timeout_minute=5),  # misspelt field
    lambda c: c.update(max_workers="8"),  # wrong type
    lambda c: c["available_node_types"]["gpu"].update(min_worker=0),
    lambda c: c["docker"].update(pull_before_runs=True),
], ids=["misspelt-top", "wrong-type", "misspelt-node-type", "misspelt-docker"])
def test_launcher_schema_rejects_a_broken_config(mutate) -> None:
    config = launcher()
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(ray_schema()).validate(config)


def test_ec2_model_rejects_a_broken_node_config() -> None:
    node_config = copy.deepcopy(launcher()["available_node_types"]["gpu"]["node_config"])
    assert "InstanceTyp" in run_instances_errors({**node_config, "InstanceTyp": node_config["InstanceType"]})
    node_config["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] = "200"
    assert "VolumeSize" in run_instances_errors(node_config)


def test_launcher_starts_as_written() -> None:
    config = launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU")}
    assert gpu, "a node type with GPUs"
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], f"{key}: the image has everything; Ray's default installs a Ray wheel"
    assert config["docker"]["image"].endswith(f"/{project_image_tag()}")
    for name, node_type in types.items():
        assert re.fullmatch(r"ami-[0-9a-f]{17}", node_type["node_config"].get("ImageId", "")), f"{name}: a current AMI"
        assert node_type["node_config"].get("IamInstanceProfile", {}).get("Name"), f"{name}: an instance profile"
    for name, node_type in gpu.items():
        assert node_type["min_workers"] == 0, f"{name}: scales from zero"
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in config[key]), f"{key}: token auth"
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    # IAM: the head's profile may launch workers with the worker's role; workers read and write S3
    head_policy = policy("head-policy.json")
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags"} <= head_policy["*"]
    for node_type in gpu.values():
        role = node_type["node_config"]["IamInstanceProfile"]["Name"]
        assert any(res.endswith(f":role/{role}") for res, acts in head_policy.items() if "iam:PassRole" in acts)
    assert head["node_config"]["IamInstanceProfile"]["Name"] != role, "the head has its own, wider role"
    worker_policy = policy("worker-policy.json")
    assert "s3:GetObject" in worker_policy["arn:aws:s3:::ARCHIVE_BUCKET/*"]
    assert "s3:PutObject" not in worker_policy["arn:aws:s3:::ARCHIVE_BUCKET/*"], "the archive is read only"
    assert {"s3:GetObject", "s3:PutObject"} <= worker_policy["arn:aws:s3:::OUTPUT_BUCKET/*"]


def policy(name: str) -> dict[str, set[str]]:
    """cluster/aws/NAME as resource -> allowed actions."""
    document = json.loads((REPO / "cluster" / "aws" / name).read_text())
    assert document["Version"] == "2012-10-17"
    allowed: dict[str, set[str]] = {}
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for resource in resources:
            allowed.setdefault(resource, set()).update(actions)
    return allowed


def test_launcher_readme_commands_run_and_fit_the_gpu_nodes() -> None:
    readme = (REPO / "cluster" / "aws" / "README.md").read_text()
    config = launcher()
    path = LAUNCHER.relative_to(REPO).as_posix()
    for command in (f"ray up -y {path}", f"ray dashboard {path}", f"ray down -y {path}"):
        assert command in readme
    gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    capacity = min(sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types),
                   config["max_workers"] * max(t["resources"]["GPU"] for t in gpu_types))
    jobs = submitted(readme)
    assert {Path(job[1]).name for _, job in jobs} == set(JOB_COMMANDS)
    for options, job in jobs:
        assert options[options.index("--address") + 1] == "http://localhost:8265", "through `ray dashboard`'s tunnel"
        assert options[options.index("--working-dir") + 1] == "."
        asked = job_gpus(job, app_paths=False)
        assert 0 < asked <= capacity, f"{shlex.join(job)} asks {asked} GPUs, the launcher's GPU nodes hold {capacity}"


# --------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="session")
def kuberay_schemas() -> Path:
    """`<shared>/schemas/kuberay` (KubeRay's CRDs), `<shared>` found as tests/conftest.py's shared_data does."""
    override = os.environ.get("RESDSN_SHARED_DATA")
    root = Path(override) if override else REPO.parent / "shared"
    folder = root / "schemas" / "kuberay"
    if not (folder / "ray.io_rayjobs.yaml").is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {folder} (set RESDSN_SHARED_DATA to the shared/ folder)")
    return folder


def structural(node: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for a Kubernetes structural OpenAPI v3 schema, as the API server applies it.

    `nullable` admits null, `x-kubernetes-int-or-string` an integer or a string, and an object
    with declared properties refuses any other field unless it preserves unknown fields (kubectl's
    default strict field validation rejects them; without it the server would drop them silently).
    CEL rules (`x-kubernetes-validations`) are not evaluated.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key not in ("nullable", "default", "description", "format"):
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_validator(folder: Path, kind: str) -> jsonschema.Draft7Validator:
    for path in sorted(folder.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("storage")]
            schema = structural(version["schema"]["openAPIV3Schema"])
            schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD for {kind} in {folder}")


def kuberay_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_jobs() -> list[tuple[str, dict[str, Any]]]:
    jobs = [(name, doc) for name, doc in kuberay_manifests() if doc["kind"] == "RayJob"]
    assert len(jobs) >= 2, "an archive job and a training job"
    return jobs


def service_account() -> str:
    (account,) = [doc for _, doc in kuberay_manifests() if doc["kind"] == "ServiceAccount"]
    assert re.fullmatch(r"arn:aws:iam::\w+:role/[\w+=,.@-]+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    return account["metadata"]["name"]


def pod_specs(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def test_kuberay_manifests_match_the_crds(kuberay_schemas: Path) -> None:
    kinds = {doc["kind"] for _, doc in kuberay_manifests()}
    assert kinds == {"RayJob", "ServiceAccount"}, kinds
    for name, doc in ray_jobs():
        assert doc["apiVersion"] == "ray.io/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
        errors = sorted(crd_validator(kuberay_schemas, "RayJob").iter_errors(doc), key=str)
        assert not errors, f"{name}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


@pytest.mark.parametrize("mutate", [
    lambda s: s["rayClusterSpec"].update(enableInTreeAutoScaling=True),  # misspelt
    lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="4"),  # wrong type
    lambda s: s["rayClusterSpec"].pop("headGroupSpec"),  # required
    lambda s: s["rayClusterSpec"]["authOptions"].update(mode="tokens"),  # not in the enum
    lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    .update({"nvidia.com/gpu": "one"}),  # not a quantity
    lambda s: s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=1),
], ids=["misspelt", "wrong-type", "missing-required", "enum", "quantity", "container-field-type"])
def test_crd_validation_rejects_a_broken_ray_job(kuberay_schemas: Path, mutate) -> None:
    name, job = ray_jobs()[0]
    job = copy.deepcopy(job)
    mutate(job["spec"])
    assert list(crd_validator(kuberay_schemas, "RayJob").iter_errors(job)), f"{name}: the broken copy was accepted"


def test_ray_jobs_start_as_written() -> None:
    account = service_account()
    for name, job in ray_jobs():
        spec = job["spec"]
        cluster = spec["rayClusterSpec"]
        assert Version(cluster["rayVersion"]) == ray_version(), f"{name}: rayVersion is the image's Ray"
        assert cluster["enableInTreeAutoscaling"] is True, f"{name}: GPU pods come and go with the job's pools"
        assert cluster["authOptions"]["mode"] == "token", f"{name}: token auth"
        assert spec["shutdownAfterJobFinishes"] is True
        assert 0 < spec["ttlSecondsAfterFinished"] <= MAX_TTL_S, f"{name}: GPU pods go soon after the job"
        assert "backoffLimit" in spec and spec["backoffLimit"] <= 2, f"{name}: retries chosen, each is a new cluster"
        for pod in pod_specs(job):
            assert pod.get("serviceAccountName") == account or any(
                "secretRef" in source for c in pod["containers"] for source in c.get("envFrom", [])), \
                f"{name}: S3 access from the service account or a Secret"
            for container in pod["containers"]:
                assert container["image"].endswith(f"/{project_image_tag()}"), f"{name}: {container['image']}"
        capacity = 0.0
        for group in cluster["workerGroupSpecs"]:
            for container in group["template"]["spec"]["containers"]:
                resources = container.get("resources", {})
                gpus = float(resources.get("limits", {}).get("nvidia.com/gpu", 0))
                if "nvidia.com/gpu" in resources.get("requests", {}):
                    assert float(resources["requests"]["nvidia.com/gpu"]) == gpus, f"{name}: GPU requests = limits"
                capacity += group["maxReplicas"] * gpus
        commands = shell_commands(spec["entrypoint"])
        assert commands, f"{name}: an entrypoint"
        for command in commands:
            asked = job_gpus(command, app_paths=True)
            assert 0 < asked <= capacity, f"{name}: {shlex.join(command)} asks {asked} GPUs, the worker groups hold {capacity}"


# --------------------------------------------------------------------------- secrets

SECRETS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "an AWS secret key": re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])"
                                    r"(?=[A-Za-z0-9/+]*[0-9])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    "a credential given a value": re.compile(
        r"(?i)\b(aws_secret_access_key|aws_session_token|ray_auth_token|auth_token|password)\b['\"]?\s*[:=]\s*"
        r"['\"]?(?![\s$'\"{<~/]|valueFrom|secretKeyRef)[^\s,}'\"]+"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
SECRETISH_ENV = re.compile(r"(?i)secret|token|password|access_key")


def secrets_in(text: str) -> list[str]:
    return [f"{what}: {m.group(0)[:12]}..." for what, pattern in SECRETS.items() for m in pattern.finditer(text)]


def env_values(node: Any) -> list[str]:
    """Names of secret-looking env entries given an inline `value` anywhere in a parsed manifest."""
    if isinstance(node, dict):
        found = [node["name"]] if {"name", "value"} <= set(node) and SECRETISH_ENV.search(str(node["name"])) else []
        return found + [n for v in node.values() for n in env_values(v)]
    if isinstance(node, list):
        return [n for v in node for n in env_values(v)]
    return []


def deployment_files() -> list[Path]:
    files = [p for p in (REPO / "cluster").rglob("*") if p.is_file()]
    return files + [REPO / "infra" / "Dockerfile", REPO / ".dockerignore", REPO / "infra" / "install.sh", REPO / "README.md"]


@pytest.mark.parametrize("planted", [
    "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_SECRET_ACCESS_KEY: hunter2",
    '"auth_token": "f00dcafe"',
    "-----BEGIN RSA PRIVATE KEY-----",
])
def test_secret_scan_finds_a_planted_secret(planted: str) -> None:
    assert secrets_in(f"x\n{planted}\ny")


def test_secret_scan_lets_references_through() -> None:
    for text in ("AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY: <from the Secret>",
                 "envFrom: [{secretRef: {name: resdsn-s3}}]  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
                 "--hash=sha256:" + "ab12" * 16, "commit 0178d7f673fd43956b1737a977b93d05436d8a18"):
        assert not secrets_in(text), text
    assert not secrets_in("file_mounts:\n  ~/.ray/auth_token: ~/.ray/auth_token")
    assert env_values({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}) == ["AWS_SECRET_ACCESS_KEY"]
    assert env_values({"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}]}) == []


def test_no_deployment_file_holds_a_secret() -> None:
    for path in deployment_files():
        text = path.read_text()
        found = secrets_in(text)
        if path.suffix in (".yaml", ".yml"):
            found += [f"env {name} with an inline value" for doc in yaml.safe_load_all(text) for name in env_values(doc)]
        assert not found, f"{path.relative_to(REPO)}: {found}"


def test_readme_job_commands_parse() -> None:
    jobs = submitted((REPO / "README.md").read_text())
    assert jobs, "the README shows how to submit the jobs"
    for _, job in jobs:
        parse_job(job, app_paths=False)
