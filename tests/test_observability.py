"""The Grafana dashboard, the alert rules and docs/metrics.md against the real /metrics output.

The test starts the sidecar as a process, makes Check calls that allow, deny
and refetch keys, scrapes /metrics and requires every metric name used in
deploy/grafana/ and deploy/prometheus/ to be one the service exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from .support import IssuerServer, SigningKey, claims_for, free_port, running_issuer

REPOSITORY = Path(__file__).resolve().parents[1]
DASHBOARD = REPOSITORY / "deploy" / "grafana" / "ext-authz-dashboard.json"
ALERTS = REPOSITORY / "deploy" / "prometheus" / "alerts.yaml"
METRICS_DOC = REPOSITORY / "docs" / "metrics.md"
START_TIMEOUT_SECONDS = 20.0
# Sample names that each metric type adds to its family name.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
# PromQL keywords that look like metric names once strings, selectors and
# label lists are removed.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "group_left", "group_right", "inf", "nan"}
OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)$")
ALERT_SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^\d+[smhd]$")


@dataclass(frozen=True)
class Exported:
    """Sample names the service exports, with the label names seen on each."""

    labels: dict[str, frozenset[str]]

    @property
    def names(self) -> set[str]:
        return set(self.labels)


def metric_names(expression: str) -> set[str]:
    """Return the metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = OFFSET.sub(" ", text)
    text = GROUPING.sub(" ", text)
    text = NUMBER.sub(" ", text)

    names = set()
    for match in IDENTIFIER.finditer(text):
        is_function = text[match.end() :].lstrip().startswith("(")
        if is_function or match.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def selector_labels(expression: str) -> list[tuple[str, str]]:
    """Return (metric, label) pairs from the label matchers of an expression."""
    pairs = []
    for selector in SELECTOR.finditer(expression):
        text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', selector.group(2))
        pairs.extend((selector.group(1), label) for label in MATCHER.findall(text))
    return pairs


def check_expression(expression: str, exported: Exported, where: str) -> None:
    names = metric_names(expression)
    assert names, f"{where}: no metric found in {expression!r}"
    unknown = names - exported.names
    assert not unknown, f"{where}: {sorted(unknown)} are not exported by the service"
    for metric, label in selector_labels(expression):
        known = exported.labels[metric]
        if known:
            assert label in known, f"{where}: {metric} has no label {label!r}"


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r}", target["expr"]))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    key = SigningKey.rsa("k1")
    other_key = SigningKey.rsa("unknown")
    with running_issuer(IssuerServer(keys=[key])) as issuer:
        text = _scrape_after_calls(tmp_path_factory.mktemp("sidecar"), issuer, key, other_key)
    yield _exported_names(text)


def _scrape_after_calls(
    workdir: Path, issuer: IssuerServer, key: SigningKey, other_key: SigningKey
) -> str:
    grpc_port, http_port = free_port(), free_port()
    config = {
        "server": {
            "grpc_address": f"127.0.0.1:{grpc_port}",
            "http_address": f"127.0.0.1:{http_port}",
        },
        "logging": {"level": "warning", "format": "json"},
        "issuers": [
            {
                "name": "local",
                "issuer": issuer.url,
                "audiences": ["Amplify Central"],
                "allow_insecure_http": True,
                # So the unknown-kid token below triggers a refetch at once.
                "jwks_min_refetch_seconds": 0,
            }
        ],
        "policies": [{"name": "default", "issuers": ["local"]}],
    }
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_authz.cli", "serve", "--config", str(config_file)],
        cwd=REPOSITORY,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    try:
        _wait_for_keys(process, f"http://127.0.0.1:{http_port}/readyz")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            for token in (
                key.sign(claims_for(issuer.url)),
                None,
                other_key.sign(claims_for(issuer.url)),
            ):
                request = CheckRequest()
                if token:
                    request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
                stub.Check(request, timeout=5)
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            return response.read().decode()
    finally:
        process.terminate()
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _wait_for_keys(process: subprocess.Popen[str], readyz_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the sidecar exited at start-up: {process.communicate()[1]}")
        try:
            with urllib.request.urlopen(readyz_url, timeout=1) as response:
                if json.load(response)["issuers"][0]["keys"] > 0:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    pytest.fail(f"the sidecar loaded no keys within {START_TIMEOUT_SECONDS:.0f} s")


def _exported_names(text: str) -> Exported:
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        # A labelled metric without samples yet still has HELP and TYPE lines.
        for suffix in SUFFIXES.get(family.type, ("",)):
            labels.setdefault(family.name + suffix, set())
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return Exported({name: frozenset(found) for name, found in labels.items()})


# The scrape itself


def test_scrape_has_labelled_series(exported: Exported):
    assert exported.labels["ext_authz_decisions_total"] == {"policy", "decision", "reason"}
    assert exported.labels["ext_authz_jwks_fetches_total"] == {"issuer", "result"}
    assert exported.labels["ext_authz_jwks_unknown_kid_refetches_total"] == {"issuer"}
    assert exported.labels["ext_authz_check_duration_seconds_bucket"] == {"le"}


def test_expression_parser_finds_names():
    expression = (
        'histogram_quantile(0.99, sum by (le, issuer) (rate(a_bucket{x="1e3"}[5m])))'
        " / on (issuer) group_left b_total offset 5m > 1e3 and c"
    )

    assert metric_names(expression) == {"a_bucket", "b_total", "c"}
    assert selector_labels(expression) == [("a_bucket", "x")]


# Grafana


def test_dashboard_valid_json():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]

    assert dashboard["uid"] == "ext-authz"
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def test_dashboard_panels_requested():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = " ".join(expression for _, expression in dashboard_queries(dashboard))

    assert "sum by (reason) (rate(ext_authz_decisions_total" in expressions
    assert "histogram_quantile(0.5, sum by (le) (rate(ext_authz_check_duration_seconds_bucket" in (
        expressions
    )
    assert "histogram_quantile(0.99, sum by (le) (rate(ext_authz_check_duration_seconds_bucket" in (
        expressions
    )
    assert "ext_authz_jwks_age_seconds" in expressions
    assert 'ext_authz_jwks_fetches_total{issuer=~"$issuer",result!~"ok|rate_limited"}' in (
        expressions
    )
    assert 'ext_authz_introspection_cache_total{issuer=~"$issuer",result="hit"}' in expressions


def test_dashboard_uses_exported_metrics(exported: Exported):
    dashboard = json.loads(DASHBOARD.read_text())

    for where, expression in dashboard_queries(dashboard):
        check_expression(expression, exported, where)

    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = LABEL_VALUES.match(variable["query"]["query"])
        assert match, f"variable {variable['name']}: unexpected query"
        metric, label = match.groups()
        assert metric in exported.names, f"variable {variable['name']}: {metric}"
        assert label in exported.labels[metric], f"variable {variable['name']}: {label}"


# Prometheus


def test_alert_rules_well_formed():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]

    assert len(names) == len(set(names))
    assert {
        "ExtAuthzDenyRateHigh",
        "ExtAuthzKeysStale",
        "ExtAuthzKeyFetchFailures",
        "ExtAuthzNoTraffic",
    } <= set(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ALERT_SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        expression = rule["expr"]
        assert expression.count("(") == expression.count(")"), rule["alert"]
        assert expression.count("{") == expression.count("}"), rule["alert"]


def test_alert_rules_use_exported_metrics(exported: Exported):
    for rule in alert_rules():
        check_expression(rule["expr"], exported, f"alert {rule['alert']}")


# Documentation


def test_metrics_doc_lists_every_metric(exported: Exported):
    text = METRICS_DOC.read_text()
    documented = set(re.findall(r"`(ext_authz_[a-z_]+)`", text))
    histograms = {
        name.removesuffix("_bucket") for name in exported.names if name.endswith("_bucket")
    }
    histogram_samples = {
        f"{name}{suffix}" for name in histograms for suffix in SUFFIXES["histogram"]
    }
    expected = (exported.names - histogram_samples) | histograms

    assert expected <= documented, f"missing from docs/metrics.md: {sorted(expected - documented)}"
    unknown = documented - expected - histogram_samples
    assert not unknown, f"documented but not exported: {sorted(unknown)}"
