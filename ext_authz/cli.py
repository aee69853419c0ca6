"""The `ext-authz` command: serve, check-config and the local development tools."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from .config import CONFIG_ENV, Config, ConfigError, load_config, resolve_config_path
from .logs import configure_logging

log = logging.getLogger("ext_authz")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    arguments = parser.parse_args(argv)
    return int(arguments.handler(arguments))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ext-authz",
        description="Envoy external-authorization sidecar that validates OAuth 2.0 bearer tokens.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="answer Envoy's Check calls")
    _add_config_option(serve)
    serve.set_defaults(handler=_serve)

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    _add_config_option(check)
    check.set_defaults(handler=_check_config)

    explain = commands.add_parser(
        "explain",
        help="show how the service decides on one token (exit 0 allow, 1 deny, 2 error)",
    )
    _add_config_option(explain)
    explain.add_argument(
        "--policy", help="policy to apply (default: the configuration's default_policy)"
    )
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--token", help="the token; prefer --token-file to keep it out of history")
    source.add_argument(
        "--token-file", type=Path, help="file that contains the token; '-' reads standard input"
    )
    explain.set_defaults(handler=_explain)

    issuer = commands.add_parser(
        "dev-issuer", help="run a demo OAuth 2.0 issuer (local development only)"
    )
    issuer.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    issuer.add_argument("--port", type=int, default=9000, help="port to bind (default 9000)")
    issuer.add_argument(
        "--issuer-url", help="issuer identifier to publish and sign (default http://HOST:PORT)"
    )
    issuer.add_argument(
        "--audience", default="Amplify Central", help="aud of issued tokens (default %(default)r)"
    )
    issuer.add_argument(
        "--token-ttl", type=int, default=3600, help="token lifetime in seconds (default 3600)"
    )
    issuer.add_argument(
        "--client",
        action="append",
        metavar="ID:SECRET",
        help="a client allowed to request tokens; repeatable (default demo-app:demo-secret)",
    )
    issuer.add_argument(
        "--key-file",
        type=Path,
        help="PEM file of the RSA signing key; created when missing (default: a new key per start)",
    )
    issuer.set_defaults(handler=_dev_issuer)

    upstream = commands.add_parser(
        "dev-upstream", help="run an HTTP upstream that echoes requests (local development only)"
    )
    upstream.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    upstream.add_argument("--port", type=int, default=8081, help="port to bind (default 8081)")
    upstream.set_defaults(handler=_dev_upstream)

    stack = commands.add_parser(
        "dev-stack", help="run Envoy, the sidecar, the dev issuer and an echo upstream locally"
    )
    stack.add_argument(
        "--workdir",
        type=Path,
        default=Path(".cache/stack"),
        help="folder for generated configs and logs (default .cache/stack)",
    )
    stack.set_defaults(handler=_dev_stack)
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", help=f"configuration file (default: ${CONFIG_ENV})"
    )


def _load(arguments: argparse.Namespace) -> tuple[Path, Config] | None:
    """Load the configuration named on the command line; print the error and return None."""
    try:
        path = resolve_config_path(arguments.config)
        return path, load_config(path)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _serve(arguments: argparse.Namespace) -> int:
    from .server import SidecarServer, StartupError, exit_after_stop

    loaded = _load(arguments)
    if loaded is None:
        return 2
    path, config = loaded
    configure_logging(config.logging.level, config.logging.format)
    if config.server.workers > 1:
        from .workers import Supervisor

        return Supervisor(config, path).run()
    try:
        SidecarServer(config, config_path=path).serve_until_signal()
    except StartupError as error:
        log.error("%s", error)
        return 1
    exit_after_stop(0)


def _check_config(arguments: argparse.Namespace) -> int:
    loaded = _load(arguments)
    if loaded is None:
        return 2
    path, config = loaded
    print(
        f"{path}: valid ({_count(len(config.issuers), 'issuer')}, "
        f"{_count(len(config.policies), 'policy', 'policies')}, "
        f"default policy {config.default_policy!r}); issuers were not contacted"
    )
    return 0


def _explain(arguments: argparse.Namespace) -> int:
    from .explain import explain

    loaded = _load(arguments)
    if loaded is None:
        return 2
    _, config = loaded
    if arguments.policy is not None and config.policy(arguments.policy) is None:
        names = ", ".join(policy.name for policy in config.policies)
        print(f"error: no policy named {arguments.policy!r}; use one of: {names}", file=sys.stderr)
        return 2

    token = arguments.token
    if arguments.token_file is not None:
        try:
            if str(arguments.token_file) == "-":
                token = sys.stdin.read()
            else:
                token = arguments.token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            print(f"error: cannot read the token file: {error}", file=sys.stderr)
            return 2
    token = token.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        print("error: the token is empty", file=sys.stderr)
        return 2

    configure_logging("warning", "text")
    return explain(config, token, arguments.policy)


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _dev_issuer(arguments: argparse.Namespace) -> int:
    from .dev.issuer import DEFAULT_CLIENTS, DevIssuer, DevIssuerSettings

    configure_logging("info", "text")
    clients = dict(DEFAULT_CLIENTS)
    if arguments.client:
        clients = {}
        for entry in arguments.client:
            client_id, separator, secret = entry.partition(":")
            if not separator or not client_id or not secret:
                print(f"error: --client expects ID:SECRET, got {client_id!r}:...", file=sys.stderr)
                return 2
            clients[client_id] = secret

    issuer = DevIssuer(
        DevIssuerSettings(
            host=arguments.host,
            port=arguments.port,
            issuer_url=arguments.issuer_url,
            audience=arguments.audience,
            token_ttl_seconds=arguments.token_ttl,
            clients=clients,
            key_file=arguments.key_file,
        )
    )
    log.warning(
        "dev-issuer is for local development only: it signs tokens for any caller that "
        "knows a demo client secret; never trust it from a production sidecar"
    )
    log.info(
        "dev-issuer %s listening on %s:%d (clients: %s, audience %r)",
        issuer.issuer_url,
        arguments.host,
        issuer.port,
        ", ".join(sorted(clients)),
        arguments.audience,
    )
    with contextlib.suppress(KeyboardInterrupt):
        issuer.serve_forever()
    return 0


def _dev_upstream(arguments: argparse.Namespace) -> int:
    from .dev.upstream import make_echo_server

    configure_logging("info", "text")
    server = make_echo_server(arguments.host, arguments.port)
    log.info("echo upstream listening on %s:%d", arguments.host, arguments.port)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


def _dev_stack(arguments: argparse.Namespace) -> int:
    from .dev.stack import run_local_stack

    return run_local_stack(arguments.workdir)


if __name__ == "__main__":
    sys.exit(main())
