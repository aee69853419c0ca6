"""Deployment files: Envoy accepts its config, docker-compose accepts the stack file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
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


def dockerfile_stages() -> list[list[str]]:
    """Return the Dockerfile's instructions per stage, continuation lines joined."""
    text = (REPOSITORY / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(" ".join(line.split()))
    return stages


def test_dockerfile_runs_as_non_root():
    final = dockerfile_stages()[-1]

    assert "USER 10001:10001" in final
    assert 'ENTRYPOINT ["ext-authz"]' in final
    assert 'CMD ["serve"]' in final
    assert "EXPOSE 9001 9002" in final


def test_dockerfile_multi_stage_slim():
    stages = dockerfile_stages()

    assert len(stages) == 2
    assert stages[0][0] == "FROM python:${PYTHON_VERSION}-slim AS build"
    assert stages[1][0] == "FROM python:${PYTHON_VERSION}-slim"
    # The final stage copies the built virtualenv and installs nothing itself.
    assert "COPY --from=build /opt/ext-authz /opt/ext-authz" in stages[1]
    assert not any("pip install" in line for line in stages[1])


def test_dockerfile_suits_read_only_root():
    environment = " ".join(line for line in dockerfile_stages()[-1] if line.startswith("ENV "))

    assert "PYTHONDONTWRITEBYTECODE=1" in environment
    assert "EXT_AUTHZ_CONFIG=/etc/ext-authz/config.yaml" in environment
    assert "TMPDIR=/tmp" in environment
    assert "HOME=/tmp" in environment


def test_dockerfile_oci_labels():
    labels = " ".join(line for line in dockerfile_stages()[-1] if line.startswith("LABEL "))

    for name in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{name}=" in labels


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """Return (excluded, pattern) pairs from .dockerignore; a later match wins."""
    patterns = []
    for line in (REPOSITORY / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excluded = not line.startswith("!")
        text = re.escape(line.lstrip("!").strip("/"))
        text = text.replace(r"\*\*/", "(?:[^/]+/)*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((excluded, re.compile(text)))
    return patterns


def build_context_files() -> list[str]:
    """Return the files docker build sends, with Docker's .dockerignore semantics.

    A pattern that matches a folder excludes everything under it.
    """
    patterns = dockerignore_patterns()

    def excluded(relative: str) -> bool:
        verdict = False
        for is_exclusion, pattern in patterns:
            if pattern.fullmatch(relative):
                verdict = is_exclusion
        return verdict

    files = []
    for folder, subfolders, names in os.walk(REPOSITORY):
        base = Path(folder).relative_to(REPOSITORY).as_posix()
        prefix = "" if base == "." else f"{base}/"
        subfolders[:] = [name for name in subfolders if not excluded(prefix + name)]
        files.extend(prefix + name for name in names if not excluded(prefix + name))
    return sorted(files)


def test_build_context_holds_only_sources():
    files = build_context_files()
    copied = [
        line.split()[1:-1]
        for line in dockerfile_stages()[0]
        if line.startswith("COPY ") and "--from" not in line
    ]

    for sources in copied:
        for source in sources:
            assert any(path == source or path.startswith(f"{source}/") for path in files), source
    assert "ext_authz/api/envoy/service/auth/v3/external_auth_pb2.py" in files
    for path in files:
        assert not path.startswith((".venv/", ".git/", "tests/", ".cache/")), path
        assert "__pycache__" not in path, path


def test_build_context_builds_wheel(tmp_path: Path):
    context = tmp_path / "context"
    for relative in build_context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / relative, target)

    # The same build as the Dockerfile's `pip install .`, without dependencies
    # and without network access.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").glob("ext_authz-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(name for name in names if name.endswith("entry_points.txt"))
        assert "ext-authz = ext_authz.cli:main" in archive.read(entry_points).decode()
    assert "ext_authz/api/envoy/service/auth/v3/external_auth_pb2.py" in names
    assert "ext_authz/dev/upstream.py" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert not any(name.startswith("tests/") for name in names)
