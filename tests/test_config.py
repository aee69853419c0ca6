"""Configuration loading: valid files, and errors that name the file, key path and fix."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz.config import ConfigError, load_config, parse_config, resolve_config_path

VALID: dict[str, Any] = {
    "server": {"grpc_address": "0.0.0.0:9001", "http_address": "0.0.0.0:9002"},
    "logging": {"level": "info", "format": "json"},
    "issuers": [
        {
            "name": "okta",
            "issuer": "https://example.okta.com/oauth2/default",
            "metadata_path": "/.well-known/openid-configuration",
            "jwks_uri": None,
            "audiences": ["Amplify Central"],
            "algorithms": ["RS256", "ES256"],
            "leeway_seconds": 30,
            "allow_insecure_http": False,
        }
    ],
    "policies": [{"name": "default", "issuers": ["okta"]}],
    "default_policy": "default",
    "deny": {"authentication_status": 403},
}


def changed(path: str, value: Any) -> dict[str, Any]:
    """Return VALID with the value at a dotted path (list indexes as numbers) replaced."""
    document = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return document


_DELETE = object()


def test_valid_config_loads():
    config = parse_config(VALID)

    assert config.issuers[0].audiences == ("Amplify Central",)
    assert config.issuers[0].algorithms == ("RS256", "ES256")
    assert config.policy("default") is not None
    assert config.deny.authentication_status == 403


def test_minimal_config_defaults():
    config = parse_config(
        {
            "issuers": [{"name": "a", "issuer": "https://a.example", "audiences": ["x"]}],
            "policies": [{"name": "p", "issuers": ["a"]}],
        }
    )

    assert config.default_policy == "p"
    assert config.server.grpc_address == "0.0.0.0:9001"
    assert config.issuers[0].metadata_path == "/.well-known/openid-configuration"
    assert config.issuers[0].leeway_seconds == 30
    assert "EdDSA" in config.issuers[0].algorithms
    assert config.logging.format == "json"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("issuers.0.audience", ["x"], "issuers[0].audience: unknown key"),
        ("server.port", 1, "server.port: unknown key"),
        ("server.grpc_threads", 16, "server.grpc_threads: replaced by server.wait_threads"),
        ("issuers.0.audiences", "Amplify Central", "issuers[0].audiences: expected a list"),
        ("issuers.0.audiences", [], "issuers[0].audiences: needs at least 1 entry"),
        ("issuers.0.leeway_seconds", "30", "issuers[0].leeway_seconds: expected an integer"),
        ("issuers.0.allow_insecure_http", "yes", "expected true or false"),
        ("issuers.0.algorithms", ["HS256"], "issuers[0].algorithms[0]: unsupported algorithm"),
        ("issuers.0.algorithms", ["none"], "unsupported algorithm 'none'"),
        ("issuers.0.issuer", "http://idp.example", "plain http URL"),
        ("issuers.0.issuer", "idp.example", "expected an absolute https URL"),
        ("issuers.0.metadata_path", "well-known", "must start with '/'"),
        ("issuers.0.name", "Okta Prod", "invalid name"),
        ("issuers.0.issuer", _DELETE, "issuers[0].issuer: missing required key"),
        ("policies.0.issuers", ["auth0"], "policies[0].issuers[0]: names issuer 'auth0'"),
        ("default_policy", "other", "default_policy: names policy 'other'"),
        ("deny.authentication_status", 500, "must be 401 or 403"),
        ("logging.level", "verbose", "logging.level: invalid value"),
        ("server.grpc_address", "9001", "expected HOST:PORT"),
        ("policies", [], "policies: needs at least 1 entry"),
    ],
)
def test_invalid_config_rejected(path: str, value: Any, expected: str):
    with pytest.raises(ConfigError) as raised:
        parse_config(changed(path, value), source="sidecar.yaml")

    message = str(raised.value)
    assert message.startswith("sidecar.yaml: ")
    assert expected in message


def test_error_message_names_fix():
    with pytest.raises(ConfigError) as raised:
        parse_config(changed("policies.0.issuers", ["auth0"]), source="f.yaml")
    assert "Use one of the names under issuers: okta." in str(raised.value)


def test_duplicate_issuer_name_rejected():
    document = copy.deepcopy(VALID)
    document["issuers"].append({**document["issuers"][0], "issuer": "https://other.example"})
    with pytest.raises(ConfigError, match=r"issuers\[1\]\.name: duplicate value 'okta'"):
        parse_config(document)


def test_http_issuer_allowed_when_insecure_set():
    document = changed("issuers.0.issuer", "http://127.0.0.1:9000")
    document["issuers"][0]["allow_insecure_http"] = True
    assert parse_config(document).issuers[0].issuer == "http://127.0.0.1:9000"


def test_missing_file_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_error(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("issuers: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(path)


def test_config_path_from_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EXT_AUTHZ_CONFIG", "/etc/ext-authz/config.yaml")
    assert resolve_config_path(None) == Path("/etc/ext-authz/config.yaml")
    assert resolve_config_path("other.yaml") == Path("other.yaml")


def test_config_path_required(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("EXT_AUTHZ_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="pass --config PATH or set EXT_AUTHZ_CONFIG"):
        resolve_config_path(None)


def run_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_authz.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_command_valid(tmp_path: Path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID))

    result = run_check_config(path)

    assert result.returncode == 0
    assert "valid" in result.stdout


def test_check_config_command_invalid(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(changed("issuers.0.audiences", "x")))

    result = run_check_config(path)

    assert result.returncode == 2
    assert "broken.yaml: issuers[0].audiences: expected a list" in result.stderr


def test_deploy_config_valid():
    deploy = Path(__file__).resolve().parents[1] / "deploy" / "ext-authz.yaml"
    assert run_check_config(deploy).returncode == 0


def test_duplicate_yaml_key_rejected(tmp_path: Path):
    path = tmp_path / "twice.yaml"
    path.write_text(
        "issuers:\n"
        "  - name: a\n"
        "    issuer: https://a.example\n"
        "    audiences: [x]\n"
        "    audiences: [y]\n"
        "policies: [{name: p, issuers: [a]}]\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "twice.yaml" in message
    assert "duplicate key 'audiences'" in message
    assert "line 5" in message


def test_same_port_for_both_servers_rejected():
    document = changed("server.http_address", "127.0.0.1:9001")
    with pytest.raises(ConfigError, match=r"uses the same port as server\.grpc_address"):
        parse_config(document)


def test_different_hosts_same_port_allowed():
    document = changed("server.grpc_address", "127.0.0.1:9001")
    document["server"]["http_address"] = "127.0.0.2:9001"
    assert parse_config(document).server.http_address == "127.0.0.2:9001"


def test_boolean_error_uses_yaml_spelling():
    with pytest.raises(ConfigError, match="got true"):
        parse_config(changed("issuers.0.leeway_seconds", True))


def test_worker_ports_must_not_reach_http_address():
    document = changed("server.grpc_address", "127.0.0.1:19001")
    document["server"]["http_address"] = "127.0.0.1:19002"
    document["server"]["workers"] = 2

    with pytest.raises(ConfigError) as raised:
        parse_config(document)

    assert "server.http_address: uses the same port as server.grpc_address (worker 1" in str(
        raised.value
    )
