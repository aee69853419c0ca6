"""Deployment files: Envoy accepts its config, docker-compose accepts the stack file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ext_authz.dev.stack import StackPorts, envoy_binary, local_envoy_config, policy_route

REPOSITORY = Path(__file__).resolve().parents[1]


def validate_envoy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_envoy_config_valid():
    result = validate_envoy(REPOSITORY / "deploy" / "envoy.yaml")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "OK" in result.stdout


def test_local_envoy_config_valid(tmp_path: Path):
    path = tmp_path / "envoy.yaml"
    config = local_envoy_config(StackPorts(), [policy_route("/other", "other")])
    path.write_text(yaml.safe_dump(config))

    result = validate_envoy(path)

    assert result.returncode == 0, result.stderr + result.stdout


def test_local_stack_keeps_filter_settings():
    deployed = yaml.safe_load((REPOSITORY / "deploy" / "envoy.yaml").read_text())
    local = local_envoy_config(StackPorts())

    def filters(config: dict) -> list:
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return manager["http_filters"]

    assert filters(local) == filters(deployed)


def test_ext_authz_filter_fails_closed():
    deployed = yaml.safe_load((REPOSITORY / "deploy" / "envoy.yaml").read_text())
    listener = deployed["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_authz = manager["http_filters"][0]["typed_config"]

    assert ext_authz["transport_api_version"] == "V3"
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["status_on_error"] == {"code": "ServiceUnavailable"}


def test_docker_compose_config_valid():
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: run `make test-deps` (Debian package)")

    result = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"envoy", "ext-authz", "dev-issuer", "upstream"}
    mounts = str(services["envoy"]["volumes"]) + str(services["ext-authz"]["volumes"])
    assert "deploy/envoy.yaml" in mounts
    assert "deploy/ext-authz.yaml" in mounts


def test_dockerfile_runs_as_non_root():
    dockerfile = (REPOSITORY / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile
    assert 'ENTRYPOINT ["ext-authz"]' in dockerfile
    assert "EXPOSE 9001 9002" in dockerfile
