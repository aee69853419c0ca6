"""Stress tests with real processes on 127.0.0.1: shutdown and reloads under steady load,
a memory soak of the Check path, and a search for secrets in debug output.

Each test starts its own processes, and every load is bounded in time and count.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from ext_authz.dev.stack import Stack, StackPorts, local_sidecar_config, policy_route

from .support import (
    AUDIENCE,
    IssuerServer,
    SigningKey,
    claims_for,
    free_port,
    running_issuer,
    write_rsa_key_pem,
)

pytestmark = pytest.mark.e2e

LOOPBACK = "127.0.0.1"
HEALTH_SERVICES = ("", "envoy.service.auth.v3.Authorization")
GRPC_OK = 0
GRPC_UNAUTHENTICATED = 16
RELOADS = "ext_authz_config_reloads_total"
JWKS_FETCHES = "ext_authz_jwks_fetches_total"


# --- processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevKey:
    """The dev issuer's RSA signing key and the PEM file the dev issuer loads it from."""

    path: Path
    private_key: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def dev_key(tmp_path_factory: pytest.TempPathFactory) -> DevKey:
    path = tmp_path_factory.mktemp("issuer") / "signing-key.pem"
    return DevKey(path, write_rsa_key_pem(path))


def free_ports() -> StackPorts:
    return StackPorts(*(free_port() for _ in range(6)))


def stack_sidecar_config(ports: StackPorts, **server: Any) -> dict[str, Any]:
    """Return the stack's sidecar config with JSON logs, no drain and the given `server` keys.

    The dev issuer's background refresh is set to an hour, so that any JWKS fetch
    during a test comes from something the test did.
    """
    config = local_sidecar_config(ports)
    config["server"].update({"drain_seconds": 0, **server})
    config["logging"] = {"level": "info", "format": "json"}
    config["issuers"][0]["jwks_refresh_seconds"] = 3600
    return config


@contextmanager
def running_stack(
    workdir: Path,
    ports: StackPorts,
    dev_key: DevKey,
    sidecar_config: dict[str, Any],
    extra_routes: list[dict[str, Any]] | None = None,
) -> Iterator[Stack]:
    stack = Stack(
        workdir=workdir,
        ports=ports,
        sidecar_config=sidecar_config,
        extra_routes=extra_routes or [],
        issuer_key_file=dev_key.path,
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def dev_signer(stack: Stack, dev_key: DevKey) -> SigningKey:
    status, body = http_get(f"{stack.issuer_url}/jwks.json")
    assert status == 200, body
    return SigningKey(json.loads(body)["keys"][0]["kid"], "RS256", dev_key.private_key)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def metric_value(metrics_text: str, sample_name: str, **labels: str) -> float:
    """Return the value of the sample with exactly these labels, or 0 when it is absent."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def wait_for_metric(
    stack: Stack, sample_name: str, expected: float, timeout: float = 15.0, **labels: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = metric_value(stack.metrics_text(), sample_name, **labels)
        if value == expected:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{sample_name}{labels} is {value}, expected {expected} within {timeout:.0f} s; "
                f"sidecar log tail:\n{stack.log_text('ext-authz')[-3000:]}"
            )
        time.sleep(0.1)


def log_entries(stack: Stack, name: str) -> list[dict[str, Any]]:
    """Return the JSON log lines of one stack process and skip the other lines."""
    entries = []
    for line in stack.log_text(name).splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def first_log_time(entries: list[dict[str, Any]], text: str) -> float | None:
    for entry in entries:
        if text in entry["message"]:
            return datetime.fromisoformat(entry["time"]).timestamp()
    return None


# --- load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request of a load: wall-clock send and finish times, and the HTTP status."""

    started: float
    finished: float
    status: int  # 0 when the connection failed or timed out
    error: str = ""


class SteadyLoad:
    """Send GET requests through Envoy from a few threads, each at a fixed rate.

    Each thread keeps one HTTP/1.1 connection open and opens a new one after an
    error. Every request's outcome is recorded with wall-clock times, so it can
    be compared with the sidecar's log timestamps.
    """

    def __init__(
        self,
        base_url: str,
        path: str,
        headers: dict[str, str],
        threads: int = 3,
        rate_per_thread: float = 20.0,
        max_seconds: float = 30.0,
    ) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self._address = (host, int(port))
        self._path = path
        self._headers = headers
        self._interval = 1.0 / rate_per_thread
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            for index in range(threads)
        ]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        with self._lock:
            return list(self._outcomes)

    def completed(self) -> int:
        with self._lock:
            return len(self._outcomes)

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Wait until `count` requests have completed in total."""
        deadline = time.monotonic() + timeout
        while self.completed() < count:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"only {self.completed()} of {count} load requests completed in {timeout:.0f} s"
                )
            time.sleep(0.05)

    def _run(self) -> None:
        connection: http.client.HTTPConnection | None = None
        next_send = time.monotonic()
        deadline = next_send + self._max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            delay = next_send - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            # A slow request delays the next one instead of causing a burst.
            next_send = max(next_send + self._interval, time.monotonic())
            started = time.time()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(*self._address, timeout=10)
                connection.request("GET", self._path, headers=self._headers)
                response = connection.getresponse()
                response.read()
                outcome = Outcome(started, time.time(), response.status)
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as error:
                outcome = Outcome(started, time.time(), 0, repr(error))
                if connection is not None:
                    connection.close()
                connection = None
            with self._lock:
                self._outcomes.append(outcome)
        if connection is not None:
            connection.close()


class ListenerProbe:
    """Connect to a TCP port every 20 ms until a connection is refused.

    `last_accepted` is the wall-clock time just before the last connect that
    succeeded, so the listener was certainly still open at that time.
    """

    def __init__(self, port: int) -> None:
        self._port = port
        self._stop = threading.Event()
        self.last_accepted: float | None = None
        self.first_refused: float | None = None
        self._thread = threading.Thread(target=self._run, name="listener-probe", daemon=True)

    def __enter__(self) -> ListenerProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            attempted = time.time()
            try:
                with socket.create_connection((LOOPBACK, self._port), timeout=1):
                    self.last_accepted = attempted
            except ConnectionRefusedError:
                self.first_refused = attempted
                return
            except OSError:
                pass  # A timeout on a busy machine does not mean that the listener closed.
            self._stop.wait(0.02)


def health_statuses(stub: health_pb2_grpc.HealthStub) -> list[int]:
    return [
        stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        for service in HEALTH_SERVICES
    ]


def wait_until_not_serving(stub: health_pb2_grpc.HealthStub, timeout: float) -> float | None:
    """Poll gRPC health until every service reports NOT_SERVING and return the wall-clock time.

    Return None when `timeout` passes, or when the server stops responding first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            statuses = health_statuses(stub)
        except grpc.RpcError:
            return None
        if set(statuses) == {health_pb2.HealthCheckResponse.NOT_SERVING}:
            return time.time()
        time.sleep(0.02)
    return None


# --- 1. graceful shutdown -------------------------------------------------------------------

DRAIN_SECONDS = 3.0
GRACE_SECONDS = 5.0
# Slack for a loaded 2-core machine on the times the shutdown contract states.
SHUTDOWN_SLACK_SECONDS = 10.0


def test_sigterm_drains_under_load(tmp_path: Path, dev_key: DevKey):
    ports = free_ports()
    config = stack_sidecar_config(
        ports, drain_seconds=DRAIN_SECONDS, shutdown_grace_seconds=GRACE_SECONDS
    )
    with running_stack(tmp_path / "stack", ports, dev_key, config) as stack:
        token = dev_signer(stack, dev_key).sign(claims_for(stack.issuer_url))
        assert http_get(stack.envoy_url, bearer(token))[0] == 200
        sidecar = stack.processes["ext-authz"]
        channel = grpc.insecure_channel(f"{LOOPBACK}:{ports.grpc}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health_statuses(health) == [health_pb2.HealthCheckResponse.SERVING] * 2

        with (
            SteadyLoad(stack.envoy_url, "/", bearer(token)) as load,
            ListenerProbe(ports.grpc) as probe,
        ):
            load.wait_for(100)
            sigterm_at = time.time()
            sidecar.send_signal(signal.SIGTERM)

            not_serving_at = wait_until_not_serving(health, SHUTDOWN_SLACK_SECONDS)
            try:
                readyz_status, _ = http_get(f"{stack.sidecar_url}/readyz")
            except (urllib.error.URLError, ConnectionError):
                readyz_status = 0  # The operations server had closed already.

            exit_code = sidecar.wait(timeout=DRAIN_SECONDS + GRACE_SECONDS + SHUTDOWN_SLACK_SECONDS)
            exited_at = time.time()
            outcomes = load.stop()
        channel.close()

        entries = log_entries(stack, "ext-authz")

    # The probe can only see the close after it happened, so every request
    # that finished before `last_open` got its response before the close.
    last_open = probe.last_accepted or 0.0
    before_close = [o for o in outcomes if o.finished <= last_open]
    failed_before_close = [o for o in before_close if o.status != 200]
    # Requests sent in the drain window, less a margin for Envoy's Check call.
    drain_end = sigterm_at + DRAIN_SECONDS - 0.5
    sent_in_drain = [o for o in outcomes if sigterm_at <= o.started <= drain_end]
    failed_in_drain = [o for o in sent_in_drain if o.status != 200]
    print(
        f"requests {len(outcomes)}, finished before the listener closed {len(before_close)}, "
        f"sent in the drain window {len(sent_in_drain)}, "
        f"NOT_SERVING after {(not_serving_at or sigterm_at) - sigterm_at:.3f} s, "
        f"listener last open {last_open - sigterm_at:.3f} s after SIGTERM, "
        f"exit after {exited_at - sigterm_at:.3f} s"
    )

    assert exit_code == 0
    assert exited_at - sigterm_at < DRAIN_SECONDS + GRACE_SECONDS + SHUTDOWN_SLACK_SECONDS
    assert not_serving_at is not None, "gRPC health did not report NOT_SERVING during the drain"
    # Health must flip at once; two seconds leave room for a loaded machine.
    assert not_serving_at - sigterm_at < 2.0
    assert readyz_status == 503
    assert probe.first_refused is not None, "the gRPC listener never closed"
    assert len(sent_in_drain) >= 20
    assert failed_in_drain == []
    assert failed_before_close == []

    received = first_log_time(entries, "received SIGTERM")
    draining = first_log_time(entries, "draining")
    stopped = first_log_time(entries, "stopped")
    assert received is not None
    assert draining is not None
    assert stopped is not None
    assert received <= draining <= stopped


# --- 2. reloads -----------------------------------------------------------------------------

REPORTS_ROUTE = "/reports"


def with_reports_policy(config: dict[str, Any], header: str, claim: str) -> dict[str, Any]:
    """Return `config` plus a policy `reports` that sends `claim` upstream in `header`."""
    changed = json.loads(json.dumps(config))
    changed["policies"].append({"name": "reports", "issuers": ["dev"], "headers": {header: claim}})
    return changed


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a new file beside `path` and rename it over `path`."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def reports_headers(stack: Stack, token: str) -> tuple[int, dict[str, str]]:
    """Return the status of a /reports request and the headers the upstream received."""
    status, body = http_get(f"{stack.envoy_url}{REPORTS_ROUTE}", bearer(token))
    return status, json.loads(body).get("headers", {}) if status == 200 else {}


def jwks_ok_fetches(stack: Stack) -> float:
    return metric_value(stack.metrics_text(), JWKS_FETCHES, issuer="dev", result="ok")


def test_sighup_reload_under_load(tmp_path: Path, dev_key: DevKey):
    ports = free_ports()
    # Polling is off, so each reload comes from the SIGHUP alone and counts once.
    config = stack_sidecar_config(ports, config_watch_seconds=0)
    routes = [policy_route(REPORTS_ROUTE, "reports")]
    with running_stack(tmp_path / "stack", ports, dev_key, config, routes) as stack:
        sidecar = stack.processes["ext-authz"]
        config_file = stack.workdir / "ext-authz.yaml"
        token = dev_signer(stack, dev_key).sign(claims_for(stack.issuer_url, sub="alice"))
        assert reports_headers(stack, token)[0] == 403  # policy_unknown: not configured yet
        fetches_before = jwks_ok_fetches(stack)
        assert fetches_before >= 1

        with SteadyLoad(stack.envoy_url, "/", bearer(token)) as load:
            load.wait_for(50)
            changed = with_reports_policy(config, "x-report-subject", "sub")
            write_atomically(config_file, yaml.safe_dump(changed, sort_keys=False))
            sidecar.send_signal(signal.SIGHUP)
            wait_for_metric(stack, RELOADS, 1, result="ok")
            status, upstream_headers = reports_headers(stack, token)
            assert status == 200
            assert upstream_headers.get("x-report-subject") == "alice"

            # Valid YAML, but the default policy names an issuer that does not exist.
            invalid = json.loads(json.dumps(config))
            invalid["policies"][0]["issuers"] = ["no-such-issuer"]
            write_atomically(config_file, yaml.safe_dump(invalid, sort_keys=False))
            sidecar.send_signal(signal.SIGHUP)
            wait_for_metric(stack, RELOADS, 1, result="invalid")
            load.wait_for(load.completed() + 50)
            outcomes = load.stop()

        status, upstream_headers = reports_headers(stack, token)
        metrics = stack.metrics_text()
        log = stack.log_text("ext-authz")

    failed = [o for o in outcomes if o.status != 200]
    assert len(outcomes) >= 100
    assert failed == []
    assert status == 200, "the rejected file replaced the configuration"
    assert upstream_headers.get("x-report-subject") == "alice"
    assert metric_value(metrics, RELOADS, result="ok") == 1
    assert metric_value(metrics, RELOADS, result="invalid") == 1
    assert metric_value(metrics, JWKS_FETCHES, issuer="dev", result="ok") == fetches_before
    assert "configuration reloaded" in log
    assert "reload rejected: " in log
    assert "no-such-issuer" in log


class ConfigMapVolume:
    """A folder laid out like a Kubernetes ConfigMap volume with one file, `name`.

    `name` is a symlink to `..data/name`, and `..data` is a symlink to a
    timestamped folder that contains the real file. `publish` writes a new
    timestamped folder, points a temporary symlink at it, renames that symlink
    over `..data` in one step and then removes the old folder, as the kubelet
    does on an update.
    """

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.current: Path | None = None
        self._updates = 0
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def publish(self, text: str) -> None:
        self._updates += 1
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        data = self.folder / f"..{stamp}.{self._updates:09d}"
        data.mkdir()
        (data / self.name).write_text(text)
        temporary = self.folder / "..data_tmp"
        temporary.symlink_to(data.name)
        os.replace(temporary, self.folder / "..data")
        if self.current is not None:
            shutil.rmtree(self.current)
        self.current = data
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.name}")


WATCH_SECONDS = 1.0


def test_configmap_swap_reload_under_load(tmp_path: Path, dev_key: DevKey):
    ports = free_ports()
    config = stack_sidecar_config(ports, config_watch_seconds=WATCH_SECONDS)
    routes = [policy_route(REPORTS_ROUTE, "reports")]
    volume = ConfigMapVolume(tmp_path / "stack", "ext-authz.yaml")
    # Stack writes its config file through the symlink, into the data folder,
    # and starts the sidecar with the symlink's path, as a pod would.
    volume.publish(yaml.safe_dump(config, sort_keys=False))
    with running_stack(volume.folder, ports, dev_key, config, routes) as stack:
        assert volume.path.is_symlink()
        token = dev_signer(stack, dev_key).sign(claims_for(stack.issuer_url, sub="alice"))
        fetches_before = jwks_ok_fetches(stack)
        assert fetches_before >= 1

        with SteadyLoad(stack.envoy_url, "/", bearer(token)) as load:
            load.wait_for(50)
            volume.publish("policies: [this is not valid YAML\n")
            wait_for_metric(stack, RELOADS, 1, result="invalid")
            assert reports_headers(stack, token)[0] == 403  # the old configuration serves
            # Three more poll intervals: an unchanged invalid file is rejected only once.
            time.sleep(3 * WATCH_SECONDS)
            assert metric_value(stack.metrics_text(), RELOADS, result="invalid") == 1

            changed = with_reports_policy(config, "x-report-subject", "sub")
            volume.publish(yaml.safe_dump(changed, sort_keys=False))
            wait_for_metric(stack, RELOADS, 1, result="ok")
            status, upstream_headers = reports_headers(stack, token)
            assert status == 200
            assert upstream_headers.get("x-report-subject") == "alice"

            # An edit of the real file inside the data folder, without a symlink swap.
            assert volume.current is not None
            edited = with_reports_policy(config, "x-report-client", "client_id")
            write_atomically(volume.current / volume.name, yaml.safe_dump(edited, sort_keys=False))
            wait_for_metric(stack, RELOADS, 2, result="ok")
            status, upstream_headers = reports_headers(stack, token)
            assert status == 200
            assert upstream_headers.get("x-report-client") == "app-1"
            assert "x-report-subject" not in upstream_headers

            load.wait_for(load.completed() + 50)
            outcomes = load.stop()

        metrics = stack.metrics_text()
        log = stack.log_text("ext-authz")

    failed = [o for o in outcomes if o.status != 200]
    assert len(outcomes) >= 100
    assert failed == []
    assert metric_value(metrics, RELOADS, result="ok") == 2
    assert metric_value(metrics, RELOADS, result="invalid") == 1
    assert metric_value(metrics, JWKS_FETCHES, issuer="dev", result="ok") == fetches_before
    assert log.count("reload rejected: ") == 1
    assert log.count("configuration reloaded") == 2


# --- 3. memory soak -------------------------------------------------------------------------

# EXT_AUTHZ_SOAK_SECONDS lengthens or shortens the soak, up to 60 s.
SOAK_SECONDS = min(float(os.environ.get("EXT_AUTHZ_SOAK_SECONDS", "30")), 60.0)
WARM_UP_SECONDS = 3.0
MAX_SOAK_CALLS = 200_000
MIN_REFETCH_SECONDS = 5
VERIFIED_TOKEN_CACHE_SIZE = 256
# Bounds on growth between the end of the warm-up and the end of the soak. On a
# 2-core VM a 30 s soak (13,000 to 17,000 calls) grew VmRSS by 0.5 to 0.7 MiB
# and left the fd count unchanged. 16 MiB fails a leak of 1.3 KiB or more per call.
RSS_GROWTH_LIMIT_BYTES = 16 * 1024 * 1024
FD_GROWTH_LIMIT = 8
TOKEN_CHARACTERS = string.ascii_letters + string.digits + "-_."


@dataclass
class StandaloneSidecar:
    process: subprocess.Popen[bytes]
    grpc_target: str
    http_url: str
    log_path: Path


@contextmanager
def running_sidecar(workdir: Path, config: dict[str, Any]) -> Iterator[StandaloneSidecar]:
    """Run `ext-authz serve` with `config`, its log in a file, until the block ends."""
    grpc_port, http_port = free_port(), free_port()
    config["server"].update(
        {"grpc_address": f"{LOOPBACK}:{grpc_port}", "http_address": f"{LOOPBACK}:{http_port}"}
    )
    config_path = workdir / "ext-authz.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "ext-authz.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "ext_authz.cli", "serve", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    sidecar = StandaloneSidecar(
        process, f"{LOOPBACK}:{grpc_port}", f"http://{LOOPBACK}:{http_port}", log_path
    )
    try:
        wait_for_keys(sidecar)
        yield sidecar
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_keys(sidecar: StandaloneSidecar, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sidecar.process.poll() is not None:
            pytest.fail(f"the sidecar exited during start-up:\n{sidecar.log_path.read_text()}")
        try:
            status, body = http_get(f"{sidecar.http_url}/readyz")
            if status == 200 and all(issuer["keys"] > 0 for issuer in json.loads(body)["issuers"]):
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    pytest.fail(f"the sidecar loaded no keys in {timeout:.0f} s:\n{sidecar.log_path.read_text()}")


def process_usage(pid: int) -> tuple[int, int]:
    """Return the resident memory (VmRSS) in bytes and the number of open fds of `pid`."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class TokenMix:
    """Distinct tokens of three kinds, chosen at random for each call.

    valid: signed by the trusted issuer's key. unknown_kid: the trusted `iss`,
    signed by a stranger's EC key under a random `kid`. garbage: random
    characters, sometimes split into three dot-separated parts.
    """

    KINDS = ("valid", "unknown_kid", "garbage")

    def __init__(self, issuer_url: str, trusted: SigningKey) -> None:
        self._issuer_url = issuer_url
        self._trusted = trusted
        self._strangers = [SigningKey.ec(f"stranger-{index}") for index in range(16)]

    def next(self, rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(self.KINDS)
        claims = claims_for(self._issuer_url, jti=secrets.token_hex(12))
        if kind == "valid":
            return kind, self._trusted.sign(claims)
        if kind == "unknown_kid":
            stranger = rng.choice(self._strangers)
            return kind, stranger.sign(
                claims, headers={"kid": secrets.token_urlsafe(rng.randint(4, 40))}
            )
        if rng.random() < 0.5:
            parts = (
                "".join(rng.choices(TOKEN_CHARACTERS, k=rng.randint(1, 400))) for _ in range(3)
            )
            return kind, ".".join(parts)
        return kind, "".join(rng.choices(TOKEN_CHARACTERS, k=rng.randint(1, 2000)))


class CheckSoak:
    """Call Check from a few threads, as fast as they can, and count outcomes by token kind.

    The threads stop when the block ends or after MAX_SOAK_CALLS calls in total.
    """

    def __init__(self, target: str, tokens: TokenMix, threads: int = 3) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = external_auth_pb2_grpc.AuthorizationStub(self._channel)
        self._tokens = tokens
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0
        # (kind, gRPC status code in CheckResponse.status, or an RpcError's name) -> count
        self.outcomes: dict[tuple[str, str], int] = {}
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(threads)
        ]

    def __enter__(self) -> CheckSoak:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self._channel.close()

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        while not self._stop.is_set() and self.calls < MAX_SOAK_CALLS:
            kind, token = self._tokens.next(rng)
            request = CheckRequest()
            request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
            try:
                response = self._stub.Check(request, timeout=10)
                result = str(response.status.code)
            except grpc.RpcError as error:
                result = error.code().name
            with self._lock:
                self.calls += 1
                self.outcomes[kind, result] = self.outcomes.get((kind, result), 0) + 1


def test_check_soak_memory_bounded(tmp_path: Path):
    trusted = SigningKey.rsa("trusted")
    with running_issuer(IssuerServer(keys=[trusted])) as issuer:
        config: dict[str, Any] = {
            # A small verified-token cache fills during the warm-up, so the soak
            # runs with it full and evicting, and the cache adds no growth.
            "server": {
                "drain_seconds": 0,
                "shutdown_grace_seconds": 5,
                "verified_token_cache_size": VERIFIED_TOKEN_CACHE_SIZE,
            },
            "logging": {"level": "info", "format": "json"},
            "issuers": [
                {
                    "name": "local",
                    "issuer": issuer.url,
                    "audiences": [AUDIENCE],
                    "allow_insecure_http": True,
                    "jwks_min_refetch_seconds": MIN_REFETCH_SECONDS,
                }
            ],
            "policies": [{"name": "default", "issuers": ["local"]}],
        }
        started = time.monotonic()
        with running_sidecar(tmp_path, config) as sidecar:
            pid = sidecar.process.pid
            tokens = TokenMix(issuer.url, trusted)
            with CheckSoak(sidecar.grpc_target, tokens) as soak:
                time.sleep(WARM_UP_SECONDS)
                rss_start, fds_start = process_usage(pid)
                calls_start = soak.calls
                samples = []
                soak_started = time.monotonic()
                while time.monotonic() - soak_started < SOAK_SECONDS:
                    time.sleep(1.0)
                    samples.append(process_usage(pid)[0])
                rss_end, fds_end = process_usage(pid)
                calls = soak.calls - calls_start
            elapsed = time.monotonic() - started
            jwks_fetches = issuer.jwks_fetches()
            status, metrics = http_get(f"{sidecar.http_url}/metrics")
            assert status == 200

    mib = 1024 * 1024
    print(
        f"soak {SOAK_SECONDS:.0f} s: {calls} calls ({calls / SOAK_SECONDS:.0f}/s); "
        f"VmRSS {rss_start / mib:.1f} -> {rss_end / mib:.1f} MiB "
        f"(max {max(samples) / mib:.1f}); fds {fds_start} -> {fds_end}; "
        f"JWKS fetches {jwks_fetches} in {elapsed:.1f} s; outcomes {soak.outcomes}"
    )

    assert calls >= 1000
    unexpected = {
        (kind, result): count
        for (kind, result), count in soak.outcomes.items()
        if result != str(GRPC_OK if kind == "valid" else GRPC_UNAUTHENTICATED)
    }
    assert unexpected == {}
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_BYTES
    assert fds_end - fds_start <= FD_GROWTH_LIMIT
    # The first fetch, then at most one per jwks_min_refetch_seconds.
    assert jwks_fetches <= 1 + elapsed // MIN_REFETCH_SECONDS + 1
    assert metric_value(metrics, JWKS_FETCHES, issuer="local", result="rate_limited") > 0
    assert (
        metric_value(
            metrics,
            "ext_authz_decisions_total",
            policy="default",
            decision="deny",
            reason="key_not_found",
        )
        > 0
    )


# --- 4. secrets at debug level --------------------------------------------------------------


def basic_credentials(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def secret_forms(credential: str) -> set[str]:
    """Return the credential, each space-separated part and, for a JWT, its payload and signature.

    JWT header segments are left out because they are not secret, and a short
    one such as `{"alg":"RS256"}` is shared by many tokens.
    """
    forms = {credential}
    for part in credential.split():
        forms.add(part)
        segments = part.split(".")
        if len(segments) == 3:
            forms.update(segment for segment in segments[1:] if len(segment) >= 16)
    return forms


LEAK_WINDOW = 20


def exposes(text: str, secret: str) -> bool:
    """Return whether `text` contains `secret` or a part of it.

    The parts are slices of LEAK_WINDOW characters that start every
    LEAK_WINDOW / 2 characters, plus the last LEAK_WINDOW characters. So any 29
    consecutive characters of the secret are found, and a token cut short in a
    log line counts as a leak.
    """
    if secret in text:
        return True
    if len(secret) < LEAK_WINDOW:
        return False
    starts = [*range(0, len(secret) - LEAK_WINDOW + 1, LEAK_WINDOW // 2)]
    starts.append(len(secret) - LEAK_WINDOW)
    return any(secret[start : start + LEAK_WINDOW] in text for start in starts)


def fetch(url: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, str, str]:
    """Return the status, the response headers as text and the body of one request."""
    request = urllib.request.Request(url, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, str(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, str(error.headers), error.read().decode()


def without_echoed_authorization(body: str) -> str:
    """Return an echo upstream body without the Authorization header it echoes by design."""
    try:
        echoed = json.loads(body)
    except json.JSONDecodeError:
        return body
    if isinstance(echoed, dict) and isinstance(echoed.get("headers"), dict):
        echoed["headers"].pop("authorization", None)
    return json.dumps(echoed)


def test_debug_output_has_no_secrets(tmp_path: Path, dev_key: DevKey):
    introspection_secret = "introspection-" + secrets.token_urlsafe(24)
    opaque_active = "opaque-" + secrets.token_urlsafe(32)
    opaque_inactive = "opaque-" + secrets.token_urlsafe(32)
    now = int(time.time())
    opaque_server = IssuerServer(
        keys=[SigningKey.ec("opaque-issuer-key")],
        introspection_credentials=("ext-authz", introspection_secret),
        introspection_results={
            opaque_active: {
                "active": True,
                "sub": "user-1",
                "client_id": "app-1",
                "aud": AUDIENCE,
                "exp": now + 300,
            }
        },
    )
    secret_file = tmp_path / "introspection-secret"
    secret_file.write_text(introspection_secret + "\n")
    demo_basic = basic_credentials("demo-app", "demo-secret")
    secret_values = {
        "demo-secret",
        introspection_secret,
        basic_credentials("ext-authz", introspection_secret),
    }

    with running_issuer(opaque_server) as opaque_issuer:
        ports = free_ports()
        config = stack_sidecar_config(ports)
        config["logging"]["level"] = "debug"
        config["issuers"].append(
            {
                "name": "opaque",
                "issuer": opaque_issuer.url,
                "audiences": [AUDIENCE],
                "allow_insecure_http": True,
                "introspection": {"client_id": "ext-authz", "client_secret_file": str(secret_file)},
            }
        )
        config["policies"].append({"name": "opaque-policy", "issuers": ["opaque"]})
        routes = [policy_route("/opaque", "opaque-policy")]

        with running_stack(tmp_path / "stack", ports, dev_key, config, routes) as stack:
            issuer = stack.issuer_url
            status, _, body = fetch(
                f"{issuer}/token",
                {"Authorization": demo_basic},
                b"grant_type=client_credentials",
            )
            assert status == 200, body
            issued = json.loads(body)["access_token"]

            signer = dev_signer(stack, dev_key)
            valid = signer.sign(claims_for(issuer, jti=secrets.token_hex(12)))
            header, _, signature = signer.sign(claims_for(issuer)).split(".")
            forged_claims = claims_for(issuer, sub="admin", jti=secrets.token_hex(12))
            forged_payload = jwt_segment(forged_claims)
            expired = signer.sign(claims_for(issuer, iat=now - 900, exp=now - 600))
            other_audience = signer.sign(claims_for(issuer, aud="Another API"))
            unknown_kid = SigningKey.ec("k-" + secrets.token_hex(16)).sign(claims_for(issuer))
            garbage = secrets.token_urlsafe(48)
            three_garbage_parts = ".".join(secrets.token_urlsafe(40) for _ in range(3))
            two_parts = f"{secrets.token_urlsafe(40)} {secrets.token_urlsafe(40)}"
            too_long = secrets.token_urlsafe(
                7000
            )  # longer than server.max_token_length (default 8192)
            # (path, Authorization value or None, expected status)
            cases: list[tuple[str, str | None, int]] = [
                ("/", f"Bearer {valid}", 200),
                ("/", f"Bearer {issued}", 200),
                ("/", f"Bearer {header}.{forged_payload}.{signature}", 403),
                ("/", f"Bearer {other_audience}", 403),
                ("/", f"Bearer {expired}", 403),
                ("/", f"Bearer {unknown_kid}", 403),
                ("/", f"Bearer {garbage}", 403),
                ("/", f"Bearer {three_garbage_parts}", 403),
                ("/", f"bearer  {two_parts}", 403),
                ("/", f"Bearer {too_long}", 403),
                ("/", demo_basic, 403),
                (f"/?access_token={valid}", None, 403),
                ("/opaque", f"Bearer {opaque_active}", 200),
                ("/opaque", f"Bearer {opaque_inactive}", 403),
            ]
            outputs: list[tuple[str, str]] = []
            for index, (path, authorization, expected) in enumerate(cases):
                headers = {}
                if authorization is not None:
                    headers["Authorization"] = authorization
                    secret_values.add(authorization)
                    secret_values.update(secret_forms(authorization.split(" ", 1)[1]))
                status, response_headers, body = fetch(stack.envoy_url + path, headers)
                assert status == expected, (index, body)
                outputs.append((f"response headers of case {index}", response_headers))
                body_text = without_echoed_authorization(body)
                outputs.append((f"response body of case {index}", body_text))

            for path in ("/metrics", "/readyz", "/healthz"):
                outputs.append((path, fetch(stack.sidecar_url + path, {})[2]))
            logs = [
                (path.name, path.read_text(errors="replace"))
                for path in stack.workdir.glob("*.log")
            ]

    assert sorted(name for name, _ in logs) == [
        "dev-issuer.log",
        "envoy.log",
        "ext-authz.log",
        "upstream.log",
    ]
    sidecar_log = dict(logs)["ext-authz.log"]
    assert '"level": "debug"' in sidecar_log
    assert opaque_server.introspections() == 2
    leaks = [
        f"{where}: {secret[:12]}..."
        for where, text in [*logs, *outputs]
        for secret in sorted(secret_values)
        if exposes(text, secret)
    ]
    assert leaks == []


def jwt_segment(claims: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
