"""Configuration: one YAML file, validated completely before anything starts.

Every error names the file, the key path and the fix, and loading stops at the
first file that is not valid. Unknown keys are errors, so a typo never turns
into a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .tracing import TracingConfig

CONFIG_ENV = "EXT_AUTHZ_CONFIG"

# Asymmetric algorithms only. With an HMAC algorithm, anyone who has the
# issuer's public key could mint tokens, and "none" needs no key at all.
SUPPORTED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
OIDC_METADATA_PATH = "/.well-known/openid-configuration"
OAUTH_METADATA_PATH = "/.well-known/oauth-authorization-server"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# Claims that carry the OAuth client id, in order of preference: RFC 9068
# `client_id`, Okta's `cid`, and OIDC's authorized party `azp` (Keycloak, Entra ID).
CLIENT_ID_CLAIMS = ("client_id", "cid", "azp")
# Values of a policy's `headers:` map that are not claim paths.
APPLICATION_VALUE = "application"
CLIENT_ID_VALUE = "client_id"
# Identity headers sent upstream when a policy sets no `headers:` map. Client
# copies of these are removed on every allowed request, whatever the policy.
DEFAULT_IDENTITY_HEADERS = (
    ("x-auth-issuer", "iss"),
    ("x-auth-subject", "sub"),
    ("x-auth-client-id", CLIENT_ID_VALUE),
    ("x-auth-application", APPLICATION_VALUE),
)
HEADER_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# Headers a policy may not set: routing, framing and credential headers.
RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "proxy-authorization",
        "cookie",
        "x-request-id",
    }
)
POLICY_MODES = ("enforce", "dry_run")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or not valid."""


@dataclass(frozen=True)
class ServerConfig:
    grpc_address: str = "0.0.0.0:9001"
    http_address: str = "0.0.0.0:9002"
    http_authz_address: str | None = None
    wait_threads: int = 16
    workers: int = 1
    shutdown_grace_seconds: float = 15.0
    drain_seconds: float = 5.0
    config_watch_seconds: float = 2.0
    require_keys_for_ready: bool = False
    max_token_length: int = 8192
    verified_token_cache_size: int = 10000


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class IntrospectionConfig:
    """RFC 7662 token introspection for opaque tokens of one issuer."""

    client_id: str
    client_secret: str = field(repr=False)
    endpoint: str | None = None  # None: the metadata's introspection_endpoint
    cache_seconds: int = 60
    cache_size: int = 10000


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    metadata_path: str = OIDC_METADATA_PATH
    metadata_url: str | None = None
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS
    leeway_seconds: int = 30
    allow_insecure_http: bool = False
    jwks_refresh_seconds: int = 300
    jwks_min_refetch_seconds: int = 30
    jwks_max_stale_seconds: int = 86400
    refetch_wait_seconds: float = 0.3
    fetch_timeout_seconds: float = 3.0
    fetch_max_bytes: int = 1024 * 1024
    client_id_claims: tuple[str, ...] = CLIENT_ID_CLAIMS
    introspection: IntrospectionConfig | None = None


@dataclass(frozen=True)
class ApplicationConfig:
    """A registered client application and the OAuth client ids it uses."""

    name: str
    client_ids: tuple[str, ...]


@dataclass(frozen=True)
class PolicyConfig:
    name: str
    issuers: tuple[str, ...]
    applications: tuple[str, ...] | None = None  # None: any client
    required_scopes: tuple[str, ...] = ()
    audiences: tuple[str, ...] | None = None  # None: each issuer's audiences
    headers: tuple[tuple[str, str], ...] = DEFAULT_IDENTITY_HEADERS
    forward_token: bool = True
    mode: str = "enforce"

    @property
    def dry_run(self) -> bool:
        return self.mode == "dry_run"


@dataclass(frozen=True)
class DenyConfig:
    authentication_status: int = 403


@dataclass(frozen=True)
class Config:
    issuers: tuple[IssuerConfig, ...]
    policies: tuple[PolicyConfig, ...]
    default_policy: str
    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deny: DenyConfig = field(default_factory=DenyConfig)
    applications: tuple[ApplicationConfig, ...] = ()
    tracing: TracingConfig = field(default_factory=TracingConfig)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        # Lookups on the Check path; the dataclass is frozen, so they stay valid.
        object.__setattr__(self, "_policies", {policy.name: policy for policy in self.policies})
        object.__setattr__(
            self,
            "_applications",
            {
                client_id: application
                for application in self.applications
                for client_id in application.client_ids
            },
        )

    def issuer(self, name: str) -> IssuerConfig:
        return next(issuer for issuer in self.issuers if issuer.name == name)

    def policy(self, name: str) -> PolicyConfig | None:
        return self._policies.get(name)  # type: ignore[attr-defined,no-any-return]

    def application_for(self, client_id: str) -> ApplicationConfig | None:
        """Return the application that registered `client_id`, if any."""
        return self._applications.get(client_id)  # type: ignore[attr-defined,no-any-return]


def resolve_config_path(path: str | None) -> Path:
    """Return the config path from the command line, else from EXT_AUTHZ_CONFIG."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError(f"no configuration file given: pass --config PATH or set {CONFIG_ENV}")
    return Path(chosen)


def load_config(path: Path) -> Config:
    """Read and validate the YAML file at `path`."""
    try:
        with path.open(encoding="utf-8") as stream:
            document = yaml.load(stream, Loader=_StrictLoader)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration file: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the file is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(document, source=str(path))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping with the same key twice.

    PyYAML keeps the last of duplicate keys, so a repeated `audiences:` would
    silently replace the first list.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}; remove one of them",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_config(document: Any, source: str = "<memory>") -> Config:
    """Validate a parsed YAML document and build the Config."""
    return _Parser(source).config(document)


class _Parser:
    """Walks the document once, with the key path of every value at hand."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {problem}. {fix}")

    # Sections

    def config(self, document: Any) -> Config:
        root = self.mapping(
            document,
            "(top level)",
            {
                "server",
                "logging",
                "tracing",
                "issuers",
                "applications",
                "policies",
                "default_policy",
                "deny",
            },
            required={"issuers", "policies"},
        )
        issuers = self.issuers(root["issuers"])
        applications = self.applications(root.get("applications", []))
        policies = self.policies(root["policies"], issuers, applications)
        policy_names = [policy.name for policy in policies]

        default_policy = self.string(root.get("default_policy", policy_names[0]), "default_policy")
        if default_policy not in policy_names:
            raise self.fail(
                "default_policy",
                f"names policy {default_policy!r}, which is not defined",
                f"Use one of the names under policies: {', '.join(policy_names)}.",
            )

        server = self.server(root.get("server", {}))
        self.check_ports(server)

        return Config(
            issuers=issuers,
            policies=policies,
            default_policy=default_policy,
            server=server,
            logging=self.logging(root.get("logging", {})),
            deny=self.deny(root.get("deny", {})),
            applications=applications,
            tracing=self.tracing(root.get("tracing", {})),
            source=self.source,
        )

    def server(self, value: Any) -> ServerConfig:
        if isinstance(value, dict) and "grpc_threads" in value:
            # The key's meaning changed with its name, so it is not taken as an alias.
            raise self.fail(
                "server.grpc_threads",
                "replaced by server.wait_threads",
                "Check calls are now decided on an event loop, and wait_threads sizes the pool "
                "for calls that wait on the network. Rename the key, or remove it to use the "
                "default of 16.",
            )
        section = self.mapping(
            value,
            "server",
            {
                "grpc_address",
                "http_address",
                "http_authz_address",
                "wait_threads",
                "workers",
                "shutdown_grace_seconds",
                "drain_seconds",
                "config_watch_seconds",
                "require_keys_for_ready",
                "max_token_length",
                "verified_token_cache_size",
            },
        )
        defaults = ServerConfig()
        return ServerConfig(
            grpc_address=self.address(
                section.get("grpc_address", defaults.grpc_address), "server.grpc_address"
            ),
            http_address=self.address(
                section.get("http_address", defaults.http_address), "server.http_address"
            ),
            workers=self.integer(section.get("workers", defaults.workers), "server.workers", 1, 64),
            http_authz_address=(
                self.address(section["http_authz_address"], "server.http_authz_address")
                if section.get("http_authz_address") is not None
                else None
            ),
            wait_threads=self.integer(
                section.get("wait_threads", defaults.wait_threads), "server.wait_threads", 1, 1024
            ),
            shutdown_grace_seconds=self.number(
                section.get("shutdown_grace_seconds", defaults.shutdown_grace_seconds),
                "server.shutdown_grace_seconds",
                0,
                600,
            ),
            drain_seconds=self.number(
                section.get("drain_seconds", defaults.drain_seconds),
                "server.drain_seconds",
                0,
                300,
            ),
            config_watch_seconds=self.number(
                section.get("config_watch_seconds", defaults.config_watch_seconds),
                "server.config_watch_seconds",
                0,
                3600,
            ),
            require_keys_for_ready=self.boolean(
                section.get("require_keys_for_ready", False), "server.require_keys_for_ready"
            ),
            verified_token_cache_size=self.integer(
                section.get("verified_token_cache_size", defaults.verified_token_cache_size),
                "server.verified_token_cache_size",
                0,
                10_000_000,
            ),
            max_token_length=self.integer(
                section.get("max_token_length", defaults.max_token_length),
                "server.max_token_length",
                256,
                1024 * 1024,
            ),
        )

    def check_ports(self, server: ServerConfig) -> None:
        """Reject port overlaps, counting the extra ports that workers use."""
        check_ports = {"server.grpc_address": server.grpc_address}
        if server.http_authz_address is not None:
            check_ports["server.http_authz_address"] = server.http_authz_address
        for key, address in check_ports.items():
            for index in range(server.workers):
                used = _shifted(address, index)
                if _same_listener(used, server.http_address):
                    worker = f" (worker {index} uses {used})" if index else ""
                    raise self.fail(
                        "server.http_address",
                        f"uses the same port as {key}{worker}",
                        f"Worker i uses the port of {key} plus i; give http_address a port "
                        "outside that range.",
                    )
        if server.http_authz_address is not None:
            grpc_ports = {_shifted(server.grpc_address, i) for i in range(server.workers)}
            for index in range(server.workers):
                used = _shifted(server.http_authz_address, index)
                if any(_same_listener(used, port) for port in grpc_ports):
                    raise self.fail(
                        "server.http_authz_address",
                        f"overlaps the gRPC ports ({used})",
                        "Keep the gRPC and HTTP front-end port ranges apart.",
                    )

    def logging(self, value: Any) -> LoggingConfig:
        section = self.mapping(value, "logging", {"level", "format"})
        return LoggingConfig(
            level=self.choice(
                section.get("level", "info"), "logging.level", ("debug", "info", "warning", "error")
            ),
            format=self.choice(section.get("format", "json"), "logging.format", ("json", "text")),
        )

    def tracing(self, value: Any) -> TracingConfig:
        section = self.mapping(
            value, "tracing", {"enabled", "service_name", "otlp_endpoint", "sample_ratio"}
        )
        endpoint = section.get("otlp_endpoint")
        if endpoint is not None:
            # The collector is the operator's own, often plain http inside the cluster.
            endpoint = self.url(endpoint, "tracing.otlp_endpoint", allow_http=True)
        return TracingConfig(
            enabled=self.boolean(section.get("enabled", False), "tracing.enabled"),
            service_name=self.string(
                section.get("service_name", "ext-authz"), "tracing.service_name"
            ),
            otlp_endpoint=endpoint,
            sample_ratio=self.number(
                section.get("sample_ratio", 1.0), "tracing.sample_ratio", 0, 1
            ),
        )

    def deny(self, value: Any) -> DenyConfig:
        section = self.mapping(value, "deny", {"authentication_status"})
        status = section.get("authentication_status", 403)
        if status not in (401, 403) or isinstance(status, bool):
            raise self.fail(
                "deny.authentication_status",
                f"must be 401 or 403, got {_yaml_text(status)}",
                "Use 403 (the default) or 401 for RFC 6750 behaviour.",
            )
        return DenyConfig(authentication_status=status)

    def issuers(self, value: Any) -> tuple[IssuerConfig, ...]:
        items = self.sequence(value, "issuers", minimum=1)
        issuers = tuple(self.issuer(item, f"issuers[{index}]") for index, item in enumerate(items))
        self.unique([issuer.name for issuer in issuers], "issuers", "name")
        self.unique([issuer.issuer for issuer in issuers], "issuers", "issuer")
        return issuers

    def issuer(self, value: Any, path: str) -> IssuerConfig:
        section = self.mapping(
            value,
            path,
            {
                "name",
                "issuer",
                "metadata_path",
                "metadata_url",
                "jwks_uri",
                "audiences",
                "algorithms",
                "leeway_seconds",
                "allow_insecure_http",
                "jwks_refresh_seconds",
                "jwks_min_refetch_seconds",
                "jwks_max_stale_seconds",
                "refetch_wait_seconds",
                "fetch_timeout_seconds",
                "fetch_max_bytes",
                "client_id_claims",
                "introspection",
            },
            required={"name", "issuer", "audiences"},
        )
        defaults = IssuerConfig(name="", issuer="", audiences=())
        name = self.name(section["name"], f"{path}.name")
        allow_http = self.boolean(
            section.get("allow_insecure_http", False), f"{path}.allow_insecure_http"
        )
        issuer = self.url(section["issuer"], f"{path}.issuer", allow_http)

        metadata_path = self.string(
            section.get("metadata_path", defaults.metadata_path), f"{path}.metadata_path"
        )
        if not metadata_path.startswith("/"):
            raise self.fail(
                f"{path}.metadata_path",
                f"must start with '/', got {metadata_path!r}",
                f"Use {OIDC_METADATA_PATH!r} or {OAUTH_METADATA_PATH!r}.",
            )
        metadata_url = section.get("metadata_url")
        if metadata_url is not None:
            metadata_url = self.url(metadata_url, f"{path}.metadata_url", allow_http)
        jwks_uri = section.get("jwks_uri")
        if jwks_uri is not None:
            jwks_uri = self.url(jwks_uri, f"{path}.jwks_uri", allow_http)

        audiences = self.strings(section["audiences"], f"{path}.audiences", minimum=1)
        algorithms = self.strings(
            section.get("algorithms", list(SUPPORTED_ALGORITHMS)), f"{path}.algorithms", minimum=1
        )
        for index, algorithm in enumerate(algorithms):
            if algorithm not in SUPPORTED_ALGORITHMS:
                raise self.fail(
                    f"{path}.algorithms[{index}]",
                    f"unsupported algorithm {algorithm!r}",
                    f"Use asymmetric algorithms from: {', '.join(SUPPORTED_ALGORITHMS)}.",
                )

        return IssuerConfig(
            name=name,
            issuer=issuer,
            metadata_path=metadata_path,
            metadata_url=metadata_url,
            jwks_uri=jwks_uri,
            audiences=audiences,
            algorithms=algorithms,
            leeway_seconds=self.integer(
                section.get("leeway_seconds", defaults.leeway_seconds),
                f"{path}.leeway_seconds",
                0,
                600,
            ),
            allow_insecure_http=allow_http,
            jwks_refresh_seconds=self.integer(
                section.get("jwks_refresh_seconds", defaults.jwks_refresh_seconds),
                f"{path}.jwks_refresh_seconds",
                10,
                86400,
            ),
            jwks_min_refetch_seconds=self.integer(
                section.get("jwks_min_refetch_seconds", defaults.jwks_min_refetch_seconds),
                f"{path}.jwks_min_refetch_seconds",
                0,
                3600,
            ),
            jwks_max_stale_seconds=self.integer(
                section.get("jwks_max_stale_seconds", defaults.jwks_max_stale_seconds),
                f"{path}.jwks_max_stale_seconds",
                60,
                30 * 86400,
            ),
            refetch_wait_seconds=self.number(
                section.get("refetch_wait_seconds", defaults.refetch_wait_seconds),
                f"{path}.refetch_wait_seconds",
                0,
                10,
            ),
            fetch_timeout_seconds=self.number(
                section.get("fetch_timeout_seconds", defaults.fetch_timeout_seconds),
                f"{path}.fetch_timeout_seconds",
                0.1,
                60,
            ),
            fetch_max_bytes=self.integer(
                section.get("fetch_max_bytes", defaults.fetch_max_bytes),
                f"{path}.fetch_max_bytes",
                1024,
                16 * 1024 * 1024,
            ),
            client_id_claims=self.strings(
                section.get("client_id_claims", list(CLIENT_ID_CLAIMS)),
                f"{path}.client_id_claims",
                minimum=1,
            ),
            introspection=(
                self.introspection(section["introspection"], f"{path}.introspection", allow_http)
                if section.get("introspection") is not None
                else None
            ),
        )

    def introspection(self, value: Any, path: str, allow_http: bool) -> IntrospectionConfig:
        if isinstance(value, dict) and "client_secret" in value:
            raise self.fail(
                f"{path}.client_secret",
                "secrets are not accepted inline",
                "Use client_secret_file or client_secret_env instead.",
            )
        section = self.mapping(
            value,
            path,
            {
                "endpoint",
                "client_id",
                "client_secret_file",
                "client_secret_env",
                "cache_seconds",
                "cache_size",
            },
            required={"client_id"},
        )
        endpoint = section.get("endpoint")
        if endpoint is not None:
            endpoint = self.url(endpoint, f"{path}.endpoint", allow_http)
        defaults = IntrospectionConfig(client_id="", client_secret="")
        return IntrospectionConfig(
            client_id=self.string(section["client_id"], f"{path}.client_id"),
            client_secret=self.client_secret(section, path),
            endpoint=endpoint,
            cache_seconds=self.integer(
                section.get("cache_seconds", defaults.cache_seconds),
                f"{path}.cache_seconds",
                0,
                3600,
            ),
            cache_size=self.integer(
                section.get("cache_size", defaults.cache_size),
                f"{path}.cache_size",
                1,
                1_000_000,
            ),
        )

    def client_secret(self, section: dict[str, Any], path: str) -> str:
        """Read the introspection client secret; errors name the source, never the secret."""
        has_file, has_env = "client_secret_file" in section, "client_secret_env" in section
        if has_file == has_env:
            raise self.fail(
                path,
                "needs exactly one of client_secret_file and client_secret_env",
                "Keep the secret out of this file: point to a file or an environment variable.",
            )
        if has_file:
            secret_path = Path(
                self.string(section["client_secret_file"], f"{path}.client_secret_file")
            )
            try:
                secret = secret_path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                reason = getattr(error, "strerror", None) or "not UTF-8 text"
                raise self.fail(
                    f"{path}.client_secret_file",
                    f"cannot read {str(secret_path)!r}: {reason}",
                    "Mount the secret file or fix the path.",
                ) from None
            source = f"{path}.client_secret_file"
        else:
            variable = self.string(section["client_secret_env"], f"{path}.client_secret_env")
            secret = os.environ.get(variable, "").strip()
            source = f"{path}.client_secret_env"
        if not secret:
            raise self.fail(source, "the client secret is empty", "Provide a non-empty secret.")
        return secret

    def applications(self, value: Any) -> tuple[ApplicationConfig, ...]:
        items = self.sequence(value, "applications")
        applications = []
        owners: dict[str, str] = {}
        for index, item in enumerate(items):
            path = f"applications[{index}]"
            section = self.mapping(
                item, path, {"name", "client_ids"}, required={"name", "client_ids"}
            )
            name = self.name(section["name"], f"{path}.name")
            client_ids = self.strings(section["client_ids"], f"{path}.client_ids", minimum=1)
            for position, client_id in enumerate(client_ids):
                if client_id in owners:
                    raise self.fail(
                        f"{path}.client_ids[{position}]",
                        f"client id {client_id!r} is already registered by application "
                        f"{owners[client_id]!r}",
                        "Register each client id in one application only.",
                    )
                owners[client_id] = name
            applications.append(ApplicationConfig(name=name, client_ids=client_ids))
        self.unique([application.name for application in applications], "applications", "name")
        return tuple(applications)

    def policies(
        self,
        value: Any,
        issuers: tuple[IssuerConfig, ...],
        applications: tuple[ApplicationConfig, ...],
    ) -> tuple[PolicyConfig, ...]:
        items = self.sequence(value, "policies", minimum=1)
        policies = tuple(
            self.policy(item, f"policies[{index}]", issuers, applications)
            for index, item in enumerate(items)
        )
        self.unique([policy.name for policy in policies], "policies", "name")
        return policies

    def policy(
        self,
        value: Any,
        path: str,
        issuers: tuple[IssuerConfig, ...],
        applications: tuple[ApplicationConfig, ...],
    ) -> PolicyConfig:
        section = self.mapping(
            value,
            path,
            {
                "name",
                "issuers",
                "applications",
                "required_scopes",
                "audiences",
                "headers",
                "forward_token",
                "mode",
            },
            required={"name", "issuers"},
        )
        issuer_names = {issuer.name for issuer in issuers}
        trusted = self.references(
            section["issuers"], f"{path}.issuers", issuer_names, "issuers", "issuer"
        )
        introspecting = [
            issuer.name for issuer in issuers if issuer.name in trusted and issuer.introspection
        ]
        if len(introspecting) > 1:
            raise self.fail(
                f"{path}.issuers",
                f"trusts several issuers with introspection ({', '.join(introspecting)})",
                "An opaque token names no issuer, so a policy may trust at most one issuer "
                "with introspection; split the API into one policy per such issuer.",
            )

        allowed_applications = None
        if section.get("applications") is not None:
            allowed_applications = self.references(
                section["applications"],
                f"{path}.applications",
                {application.name for application in applications},
                "applications",
                "application",
            )
        required_scopes = self.strings(
            section.get("required_scopes", []), f"{path}.required_scopes"
        )
        for index, scope in enumerate(required_scopes):
            if any(character.isspace() for character in scope) or '"' in scope:
                raise self.fail(
                    f"{path}.required_scopes[{index}]",
                    f"invalid scope {scope!r}",
                    "Write each scope as its own list entry, without spaces or quotes.",
                )
        audiences = None
        if section.get("audiences") is not None:
            audiences = self.strings(section["audiences"], f"{path}.audiences", minimum=1)

        return PolicyConfig(
            name=self.name(section["name"], f"{path}.name"),
            issuers=trusted,
            applications=allowed_applications,
            required_scopes=required_scopes,
            audiences=audiences,
            headers=self.headers(section.get("headers"), f"{path}.headers"),
            forward_token=self.boolean(section.get("forward_token", True), f"{path}.forward_token"),
            mode=self.choice(section.get("mode", "enforce"), f"{path}.mode", POLICY_MODES),
        )

    def references(
        self, value: Any, path: str, known: set[str], section: str, noun: str
    ) -> tuple[str, ...]:
        """Return a list of names, each of which must be defined under `section`."""
        names = self.strings(value, path, minimum=1)
        choices = ", ".join(sorted(known)) or "(none defined)"
        for position, name in enumerate(names):
            if name not in known:
                raise self.fail(
                    f"{path}[{position}]",
                    f"names {noun} {name!r}, which is not defined",
                    f"Use one of the names under {section}: {choices}.",
                )
        return names

    def headers(self, value: Any, path: str) -> tuple[tuple[str, str], ...]:
        if value is None:
            return DEFAULT_IDENTITY_HEADERS
        if not isinstance(value, dict) or not value:
            raise self.fail(
                path,
                f"expected a non-empty mapping of header name to claim, got {_type_name(value)}",
                "Write it like `x-user-email: email`.",
            )
        headers = []
        for name, claim in value.items():
            key_path = f"{path}.{name}"
            if not isinstance(name, str) or not HEADER_NAME_PATTERN.match(name):
                raise self.fail(
                    key_path,
                    f"invalid header name {name!r}",
                    "Use lower-case letters, digits and '-'.",
                )
            if name in RESERVED_HEADERS:
                raise self.fail(
                    key_path,
                    f"header {name!r} cannot carry identity",
                    "Choose another name, such as x-auth-...",
                )
            text = self.string(claim, key_path)
            if not all(part for part in text.split(".")):
                raise self.fail(
                    key_path,
                    f"invalid claim path {text!r}",
                    "Use a claim name, a dotted path such as realm_access.roles, "
                    f"{APPLICATION_VALUE!r} or {CLIENT_ID_VALUE!r}.",
                )
            headers.append((name, text))
        return tuple(headers)

    # Values

    def mapping(
        self,
        value: Any,
        path: str,
        allowed: set[str],
        required: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(
                path,
                f"expected a mapping, got {_type_name(value)}",
                "Write it as `key: value` lines.",
            )
        for key in value:
            if key not in allowed:
                raise self.fail(
                    _join(path, str(key)),
                    "unknown key",
                    f"Remove it or use one of: {', '.join(sorted(allowed))}.",
                )
        for key in sorted(required):
            if key not in value:
                raise self.fail(_join(path, key), "missing required key", f"Add `{key}:`.")
        return value

    def sequence(self, value: Any, path: str, minimum: int = 0) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(
                path, f"expected a list, got {_type_name(value)}", "Write it as a YAML list."
            )
        if len(value) < minimum:
            raise self.fail(path, f"needs at least {minimum} entry", "Add an entry.")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(
                path, f"expected a non-empty string, got {_type_name(value)}", "Quote the value."
            )
        return value

    def strings(self, value: Any, path: str, minimum: int = 0) -> tuple[str, ...]:
        items = self.sequence(value, path, minimum)
        return tuple(self.string(item, f"{path}[{index}]") for index, item in enumerate(items))

    def name(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        if not NAME_PATTERN.match(text):
            raise self.fail(
                path,
                f"invalid name {text!r}",
                "Use lower-case letters, digits, '_', '.' and '-' (at most 63 characters).",
            )
        return text

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(
                path, f"invalid value {_yaml_text(value)}", f"Use one of: {', '.join(choices)}."
            )
        return str(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(
                path, f"expected true or false, got {_yaml_text(value)}", "Write true or false."
            )
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(
                path,
                f"expected an integer from {low} to {high}, got {_yaml_text(value)}",
                "Fix the value.",
            )
        return value

    def number(self, value: Any, path: str, low: float, high: float) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.fail(
                path,
                f"expected a number from {low} to {high}, got {_yaml_text(value)}",
                "Fix the value.",
            )
        return float(value)

    def address(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        host, separator, port = text.rpartition(":")
        if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise self.fail(
                path, f"expected HOST:PORT, got {text!r}", 'Write it like "0.0.0.0:9001".'
            )
        return text

    def url(self, value: Any, path: str, allow_http: bool) -> str:
        text = self.string(value, path)
        parts = urlsplit(text)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise self.fail(
                path, f"expected an absolute https URL, got {text!r}", "Write the full URL."
            )
        if parts.scheme == "http" and not allow_http:
            raise self.fail(
                path,
                f"plain http URL {text!r} is refused",
                "Use https, or set allow_insecure_http: true on this issuer for local development.",
            )
        return text

    def unique(self, values: list[str], path: str, key: str) -> None:
        seen: set[str] = set()
        for index, value in enumerate(values):
            if value in seen:
                raise self.fail(
                    f"{path}[{index}].{key}",
                    f"duplicate value {value!r}",
                    f"Give each entry its own {key}.",
                )
            seen.add(value)


def _join(path: str, key: str) -> str:
    return key if path == "(top level)" else f"{path}.{key}"


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _shifted(address: str, offset: int) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + offset}"


def _same_listener(first: str, second: str) -> bool:
    """Return whether two HOST:PORT addresses would bind the same port."""
    first_host, _, first_port = first.rpartition(":")
    second_host, _, second_port = second.rpartition(":")
    wildcard = {"0.0.0.0", "::", "[::]", "*"}
    hosts_overlap = first_host == second_host or bool({first_host, second_host} & wildcard)
    return first_port == second_port and hosts_overlap


def _yaml_text(value: Any) -> str:
    """Return a scalar as it is written in YAML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)
