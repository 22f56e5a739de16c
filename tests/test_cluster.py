"""cluster.yaml: Ray's own schema check (offline) plus the invariants this project relies on.

There is no `ray up --dry-run`. `prepare_config` merges the provider's defaults.yaml (for AWS a file
shipped inside Ray: no boto3, no network) and `validate_config` runs Ray's JSON schema
(`ray/autoscaler/ray-schema.json`, which rejects unknown top-level and docker keys) plus Ray's
cross-field checks. AWS-side checks (instance types, quotas, IAM, AMI) happen only at `ray up`.

The second half checks the README's "On a cluster" section against the file: every experiment and
sweep it submits loads, fits one GPU node type (GPUs, CPUs, GPU memory; preflight's own resource
check) and keeps its state on storage every node sees, with MLflow on the head's server.
"""

import copy
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray._private.label_utils import validate_label_key, validate_label_value
from ray.autoscaler._private.util import prepare_config, validate_config

from scalelab import storage
from scalelab.config import ExperimentConfig, load_experiment
from scalelab.sweep.config import expand, load_sweep
from scalelab.train.preflight import check_resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
SHARED = "/mnt/shared"  # the EFS mount every node has (initialization_commands)
GPU_MEMORY_LABEL = "scalelab/gpu-memory-gb"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if schema preparation tries to reach AWS (or anything else)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("cluster.yaml validation must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(config: dict[str, Any]) -> dict[str, Any]:
    # prepare_config mutates nested dicts of its input; keep the fixture pristine.
    return prepare_config(copy.deepcopy(config))


def test_ray_schema_accepts_cluster_yaml(config: dict[str, Any], no_network: None) -> None:
    prepared = _prepared(config)
    validate_config(prepared)
    # Things prepare_config fills in that `ray up` relies on.
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    assert config["setup_commands"][0] in prepared["worker_setup_commands"]


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: c.update(max_worker=c.pop("max_workers")), id="typo-top-level-key"),
        pytest.param(lambda c: c["docker"].update(pull_before_rum=True), id="typo-docker-key"),
        pytest.param(lambda c: c["available_node_types"]["head"].pop("resources"), id="missing-resources"),
        pytest.param(
            lambda c: c["available_node_types"]["head"].update(resources={"CPU": 0.5}), id="fractional-cpu"
        ),
    ],
)
def test_ray_schema_rejects_broken_copies(config: dict[str, Any], break_it: Any, no_network: None) -> None:
    """Proves the validator really checks: the same path that accepts cluster.yaml rejects these."""
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(_prepared(broken))


def test_head_node_runs_no_training(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0


def test_at_least_two_gpu_worker_types(config: dict[str, Any]) -> None:
    gpu_types = {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"] and node["resources"].get("GPU", 0) > 0
    }
    assert len(gpu_types) >= 2, gpu_types
    for name, node in gpu_types.items():
        assert node.get("min_workers", 0) == 0, f"{name}: GPU nodes scale from zero"
        assert 0 < node["max_workers"] <= config["max_workers"], name


def test_docker_image_matches_installed_and_locked_ray(config: dict[str, Any]) -> None:
    assert config["docker"]["image"] == IMAGE
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert f"ray=={ray.__version__}" in (ROOT / "constraints.txt").read_text().split()


def test_setup_installs_project_at_its_lock(config: dict[str, Any]) -> None:
    assert (ROOT / "constraints.txt").is_file()
    assert config["file_mounts"]["~/scalelab"] == "."
    # The s3 extra (boto3: the autoscaler's EC2 client, MLflow's S3 store) comes from the lock as well.
    assert config["setup_commands"] == ['pip install -c ~/scalelab/constraints.txt -e "$HOME/scalelab[s3]"']
    assert re.search(r"^boto3==", (ROOT / "constraints.txt").read_text(), re.M)
    others = config["head_setup_commands"] + config["worker_setup_commands"]
    assert not any("pip install" in c for c in others)


def test_ray_and_mlflow_bind_private_addresses(config: dict[str, Any]) -> None:
    commands = config["head_start_ray_commands"]
    ray_start = next(c for c in commands if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in ray_start

    mlflow = next(c for c in commands if "mlflow server" in c)
    match = re.search(r"--host\s+(\$\(.*?\)|\S+)\s+--port\s+(\d+)", mlflow)
    assert match, mlflow
    host, port = match.groups()
    # Wildcards expose the server to the internet-facing interface; loopback hides it from workers.
    assert host not in {"0.0.0.0", "::", "[::]", "127.0.0.1", "localhost"}
    assert "hostname -I" in host, "bind the instance's private (VPC) address"
    assert port == "5000"
    assert "--backend-store-uri sqlite:////home/ray/mlflow/mlflow.db" in mlflow
    assert f"--artifacts-destination {SHARED}/mlartifacts" in mlflow
    assert any(c.startswith("mkdir -p /home/ray/mlflow") for c in commands)


_SECRET_KEY = re.compile(r"secret|password|passwd|token|access_key|private_key|session_key|credential", re.I)
_SECRET_VALUE = re.compile(
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"  # AWS secret access keys
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
)


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def test_no_credentials_in_cluster_yaml(config: dict[str, Any]) -> None:
    text = CLUSTER_YAML.read_text()
    for word in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "password"):
        assert word not in text.lower(), word
    assert not _SECRET_VALUE.search(text)
    for key, value in _walk(config):
        assert not _SECRET_KEY.search(str(key)), key
        if isinstance(value, str):
            assert not _SECRET_VALUE.search(value), key
    # Ray generates and registers its own SSH key pair; none is pinned here.
    assert set(config["auth"]) == {"ssh_user"}
    assert config["auth"]["ssh_user"] == "ubuntu"


# --------------------------------------------------------------------------- shared storage
def _bind_mounts(config: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of the `-v host:container` options every container gets."""
    mounts = {}
    for option in config["docker"]["run_options"]:
        match = re.fullmatch(r"-v (\S+):(\S+)", option)
        if match:
            mounts[match.group(2)] = match.group(1)
    return mounts


def _shared_paths(config: dict[str, Any]) -> list[str]:
    """Paths that name the same files in every container: binds of the shared mount."""
    return [inside for inside, host in _bind_mounts(config).items()
            if host == SHARED or host.startswith(SHARED + "/")]


def test_every_node_mounts_the_shared_file_system(config: dict[str, Any]) -> None:
    commands = config["initialization_commands"]  # on the host, every node, before docker starts
    mount = next(c for c in commands if " mount -t nfs4 " in f" {c} ")
    region = config["provider"]["region"]
    assert re.search(rf"\S+\.efs\.{re.escape(region)}\.amazonaws\.com:/ {SHARED}$", mount), mount
    assert "hard" in mount and "nfsvers=4.1" in mount  # AWS's recommended options; soft mounts lose writes
    assert not any(node.get("initialization_commands") for node in config["available_node_types"].values()), \
        "a node type's own initialization_commands would replace the mount"
    assert _bind_mounts(config)[SHARED] == SHARED
    assert _bind_mounts(config)["/data"] == f"{SHARED}/data"
    made = " ".join(commands)
    for folder in ("data", "runs", "mlartifacts"):
        assert f"{SHARED}/{folder}" in made


# --------------------------------------------------------------------------- the README's recipes
# GPU memory (GB per GPU) each recipe needs at its micro-batch, keyed by (task, preset, micro-batch size),
# from the per-image activation estimates in the experiment files' comments. A recipe whose key is
# missing here fails the test: size it (and say why in its file) before sending it to the cluster.
GPU_MEMORY_GB = {
    # vit-b16-gpu.yaml: ~60 MB/image, 256 images ~15 GB + model and Adam state; "sized for 80 GB GPUs".
    ("contrastive", "vit-b16", 256): 80,
    # basic-s.yaml: CoAtNet-0, 256 images ~15-25 GB of activations, "fits 80 GB".
    ("contrastive", "basic-s", 256): 80,
    # basic-m.yaml: CoAtNet-3, ~4x CoAtNet-0's activations per image, half the micro-batch: ~30-50 GB.
    ("contrastive", "basic-m", 128): 80,
    # basic-l.yaml: ~0.7 GB/image, 32 images ~25 GB; ZeRO-3 spreads the ~40 GB of weights and state.
    ("contrastive", "basic-l", 32): 80,
    # Stage 1 (no text tower): basic-s 512 CoAtNet-0 images ~30-50 GB; m and l at stage 2's micro-batch,
    # beside their unpartitioned (ZeRO-0) weights and optimizer state (~35 GB for basic-l).
    ("classify", "basic-s", 512): 80,
    ("classify", "basic-m", 128): 80,
    ("classify", "basic-l", 32): 80,
}


def _cluster_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## On a cluster\n")
    return text[start:text.index("\n## ", start + 1)]


def _submissions() -> list[tuple[str, str, list[str]]]:
    """(command, file, --set overrides) of each `submit scalelab ...` line of the README's cluster section."""
    found = []
    for line in _cluster_section().splitlines():
        if line.startswith("submit scalelab "):
            words = shlex.split(line, comments=True)
            command, path, rest = words[2], words[3], words[4:]
            overrides = [rest[i + 1] for i, word in enumerate(rest) if word == "--set"]
            assert len(overrides) * 2 == len(rest), f"only --set options are checked: {line}"
            found.append((command, path, overrides))
    return found


def _experiments(command: str, path: str, overrides: list[str]) -> list[ExperimentConfig]:
    """The experiment configs a submission runs: the one of `scalelab train`, every trial of a sweep."""
    if command == "train":
        return [load_experiment(ROOT / path, overrides)]
    assert command == "sweep", command
    sweep, base = load_sweep(ROOT / path, overrides)
    return [trial.experiment for trial in expand(sweep, base)]


def _gpu_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: node for name, node in config["available_node_types"].items()
            if node["resources"].get("GPU", 0) > 0}


def test_readme_cluster_section_submits_every_recipe_it_names() -> None:
    section = _cluster_section()
    named = set(re.findall(r"\b(?:experiments|sweeps)/[\w.-]+\.yaml\b", section))
    submitted = {path for _, path, _ in _submissions()}
    assert submitted, "no `submit scalelab ...` line in the README's cluster section"
    assert named <= submitted, f"named but not checked here: {sorted(named - submitted)}"
    assert {"train", "sweep"} <= {command for command, _, _ in _submissions()}
    for path in submitted:
        assert (ROOT / path).is_file(), path


def test_readme_jobs_log_to_the_heads_mlflow_server(config: dict[str, Any]) -> None:
    """`submit` passes the head's server to every job: required for a bucket (no sqlite there), and on
    the shared file system it keeps sqlite off NFS."""
    section = _cluster_section()
    definition = section[section.index("submit() {"):]
    definition = definition[:definition.index("\n}")]
    assert "ray job submit" in definition and "--submission-id" in definition
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    port = re.search(r"--port\s+(\d+)", mlflow).group(1)
    assert re.search(rf'MLFLOW_TRACKING_URI\\?": \\?"http://\$HEAD_IP:{port}\\?"', definition), definition
    assert "HEAD_IP=<head-private-ip>" in section
    assert f"-L {port}:<head-private-ip>:{port}" in section  # the port-forward to the UI


def test_node_types_state_their_gpu_memory(config: dict[str, Any]) -> None:
    for name, node in _gpu_node_types(config).items():
        labels = node.get("labels", {})
        assert GPU_MEMORY_LABEL in labels, f"{name}: state the GPU memory per card in labels"
        for key, value in labels.items():
            assert validate_label_key(key) is None, validate_label_key(key)
            validate_label_value(value)  # raises on a value Ray's node labels refuse
        assert int(labels[GPU_MEMORY_LABEL]) > 0


def _fit(cfg: ExperimentConfig, name: str, node: dict[str, Any], cluster_max: int) -> list[str]:
    """Why `cfg` does not fit node type `name` (empty when it does), in preflight's own words."""
    resources = {k: float(v) for k, v in node["resources"].items()}
    nodes = min(node["max_workers"], cluster_max)
    pool = {k: v * nodes for k, v in resources.items()}
    t, d = cfg.train, cfg.data
    # Every decode task running beside its worker, not only the one preflight requires to make progress.
    all_decode = t.num_workers * max(d.decode_tasks - 1, 0) * d.decode_cpus
    short = check_resources(cfg, pool, f"{nodes} x {name}", extra_cpus=all_decode)
    # Ray packs a GPU worker where its GPU is: a full node holds one worker per GPU, and their CPUs.
    per_node = min(t.num_workers, int(resources["GPU"]))
    one_node = cfg.model_copy(update={"train": t.model_copy(update={"num_workers": per_node})})
    short += check_resources(one_node, resources, f"one {name}",
                             extra_cpus=per_node * max(d.decode_tasks - 1, 0) * d.decode_cpus)
    need = GPU_MEMORY_GB.get((cfg.task, cfg.model.preset, t.micro_batch_size))
    if need is None:
        short.append(f"no GPU memory estimate for {(cfg.task, cfg.model.preset, t.micro_batch_size)}")
    elif int(node["labels"][GPU_MEMORY_LABEL]) < need:
        short.append(f"needs {need} GB per GPU, {name} has {node['labels'][GPU_MEMORY_LABEL]} GB")
    return short


@pytest.mark.parametrize("submission", _submissions(), ids=lambda s: " ".join([s[0], s[1], *s[2]]))
def test_readme_recipe_fits_a_node_type_on_shared_storage(config: dict[str, Any],
                                                          submission: tuple[str, str, list[str]]) -> None:
    experiments = _experiments(*submission)
    assert experiments
    shared = _shared_paths(config)
    for cfg in experiments:
        assert cfg.train.use_gpu, f"{cfg.name}: a GPU cluster runs GPU recipes"
        why = {name: _fit(cfg, name, node, config["max_workers"])
               for name, node in _gpu_node_types(config).items()}
        assert any(not short for short in why.values()), f"{cfg.name} fits no node type: {why}"
        # State every node sees: the shared mount, or a bucket (then MLflow must be named, as `submit` does).
        run_storage = str(cfg.run.storage)
        assert storage.is_uri(run_storage) or any(
            run_storage == p or run_storage.startswith(p + "/") for p in shared
        ), f"{cfg.name}: run.storage {run_storage} is not on {shared} or a bucket"
        if cfg.model.image.init:
            assert any(cfg.model.image.init.startswith(p + "/") for p in shared), cfg.model.image.init
        for source in cfg.data.sources:
            assert any(str(source.path).startswith(p + "/") for p in shared), source.path
