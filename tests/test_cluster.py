"""cluster.yaml: Ray's own schema check (offline) plus the invariants this project relies on.

There is no `ray up --dry-run`. `prepare_config` merges the provider's defaults.yaml (for AWS a file
shipped inside Ray: no boto3, no network) and `validate_config` runs Ray's JSON schema
(`ray/autoscaler/ray-schema.json`, which rejects unknown top-level and docker keys) plus Ray's
cross-field checks. AWS-side checks (instance types, quotas, IAM, AMI) happen only at `ray up`.
"""

import copy
import re
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


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
    assert "pip install -c ~/scalelab/constraints.txt -e ~/scalelab" in config["setup_commands"]


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
    assert "--artifacts-destination s3://" in mlflow
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
