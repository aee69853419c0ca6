"""Tests of the generated ext_authz.api code and its wire compatibility with Envoy's protos.

The reference is the xds-protos package (Envoy's own generated Python code). Its top-level
`envoy` package defines the same protobuf message names as ext_authz.api, and one process
cannot load both into the default descriptor pool. So xds-protos lives in its own folder
and is imported only by XDS_PROGRAM, which runs in a subprocess.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, json_format, wrappers_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.message import Message

from ext_authz.api.envoy.config.core.v3 import address_pb2, base_pb2
from ext_authz.api.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ext_authz.api.envoy.type.v3 import http_status_pb2
from ext_authz.api.google.rpc import status_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATOR = REPO_ROOT / "tools" / "gen_protos.py"
API_DIR = Path("ext_authz") / "api"
OUR_PROTO_MODULES = (
    address_pb2,
    base_pb2,
    attribute_context_pb2,
    external_auth_pb2,
    http_status_pb2,
    status_pb2,
)
SUBPROCESS_TIMEOUT_SECONDS = 120

# Values of the CheckRequest that XDS_PROGRAM builds. The same dict goes to the subprocess
# as input and serves here as the expected values.
REQUEST_VALUES: dict[str, Any] = {
    "source_address": "192.0.2.10",
    "source_port": 53124,
    "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend",
    "destination_address": "198.51.100.20",
    "destination_port": 8080,
    "time_seconds": 1_700_000_000,
    "time_nanos": 250_000_000,
    "request_id": "5d0c9a1e-8b7f-4f3e-9a51-2c4be1f0d7a3",
    "method": "POST",
    "headers": {
        ":authority": "api.example.com",
        ":method": "POST",
        ":path": "/v1/orders?limit=5",
        "authorization": "Bearer header.payload.signature",
        "x-request-id": "5d0c9a1e-8b7f-4f3e-9a51-2c4be1f0d7a3",
    },
    "path": "/v1/orders?limit=5",
    "host": "api.example.com",
    "scheme": "https",
    "protocol": "HTTP/2",
    "size": 16,
    "body": '{"item": "book"}',
    "raw_body_base64": base64.b64encode(b"\x00\xffbinary").decode(),
    # Two entries with the same key, as Envoy sends them when encode_raw_headers is set.
    "header_map": [
        ["x-forwarded-for", "192.0.2.1"],
        ["x-forwarded-for", "198.51.100.4"],
    ],
    "context_extensions": {"policy": "default"},
    "metadata_filter": "envoy.filters.http.jwt_authn",
    "metadata": {"sub": "alice", "scope": ["orders.read"], "exp": 1_700_003_600},
    "route_metadata_filter": "ext_authz",
    "route_metadata": {"audience": "orders-api", "required": True},
    "sni": "api.example.com",
}

# Runs with only xds-protos (and its dependencies) on PYTHONPATH. It reads one JSON command
# from stdin and writes one JSON result to stdout. Binary messages travel as base64.
XDS_PROGRAM = r"""
import base64
import json
import sys

from google.protobuf import descriptor_pb2, descriptor_pool, json_format

from envoy.service.auth.v3 import external_auth_pb2


def build_check_request(values):
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes

    source = attributes.source
    source.address.socket_address.address = values["source_address"]
    source.address.socket_address.port_value = values["source_port"]
    source.principal = values["source_principal"]
    destination = attributes.destination.address.socket_address
    destination.address = values["destination_address"]
    destination.port_value = values["destination_port"]

    attributes.request.time.seconds = values["time_seconds"]
    attributes.request.time.nanos = values["time_nanos"]
    http = attributes.request.http
    http.id = values["request_id"]
    http.method = values["method"]
    http.headers.update(values["headers"])
    http.path = values["path"]
    http.host = values["host"]
    http.scheme = values["scheme"]
    http.protocol = values["protocol"]
    http.size = values["size"]
    http.body = values["body"]
    http.raw_body = base64.b64decode(values["raw_body_base64"])
    for key, value in values["header_map"]:
        http.header_map.headers.add(key=key, raw_value=value.encode())

    attributes.context_extensions.update(values["context_extensions"])
    filter_metadata = attributes.metadata_context.filter_metadata
    filter_metadata[values["metadata_filter"]].update(values["metadata"])
    route_metadata = attributes.route_metadata_context.filter_metadata
    route_metadata[values["route_metadata_filter"]].update(values["route_metadata"])
    attributes.tls_session.sni = values["sni"]
    return request


def unknown_field_bytes(message):
    copy = type(message)()
    copy.CopyFrom(message)
    size_with_unknown = copy.ByteSize()
    copy.DiscardUnknownFields()
    return size_with_unknown - copy.ByteSize()


def encode(data):
    return base64.b64encode(data).decode()


def build_request(command):
    return {"data": encode(build_check_request(command["values"]).SerializeToString())}


def compare_request(command):
    parsed = external_auth_pb2.CheckRequest.FromString(base64.b64decode(command["data"]))
    return {
        "equal": parsed == build_check_request(command["values"]),
        "unknown_field_bytes": unknown_field_bytes(parsed),
    }


def round_trip_response(command):
    parsed = external_auth_pb2.CheckResponse.FromString(base64.b64decode(command["data"]))
    return {
        "dict": json_format.MessageToDict(parsed, preserving_proto_field_name=True),
        "http_response": parsed.WhichOneof("http_response"),
        "unknown_field_bytes": unknown_field_bytes(parsed),
        "data": encode(parsed.SerializeToString()),
    }


def describe(command):
    pool = descriptor_pool.Default()
    messages = {
        name: to_proto(pool.FindMessageTypeByName(name), descriptor_pb2.DescriptorProto)
        for name in command["messages"]
    }
    enums = {
        name: to_proto(pool.FindEnumTypeByName(name), descriptor_pb2.EnumDescriptorProto)
        for name in command["enums"]
    }
    return {"messages": messages, "enums": enums}


def to_proto(descriptor, proto_class):
    result = proto_class()
    descriptor.CopyToProto(result)
    return encode(result.SerializeToString())


COMMANDS = {
    "build_request": build_request,
    "compare_request": compare_request,
    "round_trip_response": round_trip_response,
    "describe": describe,
}

command = json.load(sys.stdin)
json.dump(COMMANDS[command["name"]](command), sys.stdout)
"""


@pytest.fixture(scope="module")
def xds_protos_path() -> Path:
    default = REPO_ROOT / ".cache" / "xds-protos"
    path = Path(os.environ.get("XDS_PROTOS_PATH", default))
    if not (path / "envoy" / "service" / "auth" / "v3" / "external_auth_pb2.py").is_file():
        pytest.fail(
            f"xds-protos is not installed in {path}. Run `make test-deps`, or set "
            "XDS_PROTOS_PATH to a folder made with "
            "`pip install --target DIR xds-protos==1.85.0`."
        )
    return path


def run_xds_program(xds_path: Path, name: str, **fields: Any) -> dict[str, Any]:
    """Run one XDS_PROGRAM command in a subprocess and return its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(xds_path)}
    result = subprocess.run(
        [sys.executable, "-c", XDS_PROGRAM],
        input=json.dumps({"name": name, **fields}),
        capture_output=True,
        text=True,
        env=env,
        cwd=xds_path,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, f"xds-protos subprocess failed:\n{result.stderr}"
    return json.loads(result.stdout)


def encode(message: Message) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def decode(data: str) -> bytes:
    return base64.b64decode(data)


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def unknown_field_bytes(message: Message) -> int:
    """Return how many serialized bytes of message, nested messages included, are unknown fields.

    UnknownFields() raises NotImplementedError in the upb backend (protobuf 7.36), so this
    compares the size before and after DiscardUnknownFields(), which works recursively.
    """
    copy = type(message)()
    copy.CopyFrom(message)
    size_with_unknown = copy.ByteSize()
    copy.DiscardUnknownFields()
    return size_with_unknown - copy.ByteSize()


def list_files(root: Path) -> dict[str, bytes]:
    """Return the contents of every file under root/API_DIR, keyed by path relative to root."""
    files = {}
    for path in sorted((root / API_DIR).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, f"tools/gen_protos.py failed:\n{result.stderr}"

    committed = list_files(REPO_ROOT)
    generated = list_files(tmp_path)
    hint = "ext_authz/api is out of date with protos/; run `make protos` and commit the result"

    missing = sorted(generated.keys() - committed.keys())
    assert not missing, f"{hint}. Missing files: {missing}"
    extra = sorted(committed.keys() - generated.keys())
    assert not extra, f"{hint}. Files that protoc no longer generates: {extra}"
    changed = sorted(name for name in generated if generated[name] != committed.get(name))
    assert not changed, f"{hint}. Changed files: {changed}"


def build_allow_response() -> external_auth_pb2.CheckResponse:
    action = base_pb2.HeaderValueOption.HeaderAppendAction
    response = external_auth_pb2.CheckResponse()
    response.status.code = 0
    ok = response.ok_response
    ok.headers.add(
        header=base_pb2.HeaderValue(key="x-auth-subject", value="alice"),
        append=wrappers_pb2.BoolValue(value=False),
        append_action=action.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    ok.headers.add(
        header=base_pb2.HeaderValue(key="x-auth-scope", value="orders.read"),
        append_action=action.ADD_IF_ABSENT,
    )
    ok.headers_to_remove.append("authorization")
    ok.response_headers_to_add.add(
        header=base_pb2.HeaderValue(key="x-auth-cache", value="hit"),
        append_action=action.OVERWRITE_IF_EXISTS,
    )
    response.dynamic_metadata.update(
        {"sub": "alice", "scope": ["orders.read"], "exp": 1_700_003_600, "admin": False}
    )
    return response


def build_deny_response(
    grpc_code: int, http_code: http_status_pb2.StatusCode, message: str, body: str
) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse()
    response.status.code = grpc_code
    response.status.message = message
    denied = response.denied_response
    denied.status.code = http_code
    denied.headers.add(
        header=base_pb2.HeaderValue(key="www-authenticate", value='Bearer error="invalid_token"'),
        append=wrappers_pb2.BoolValue(value=False),
    )
    denied.headers.add(header=base_pb2.HeaderValue(key="content-type", value="application/json"))
    denied.body = body
    return response


def build_error_response() -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse()
    response.status.code = 13  # INTERNAL
    response.status.message = "token validation failed"
    response.error_response.status.code = http_status_pb2.InternalServerError
    response.error_response.body = "internal error"
    return response


RESPONSE_CASES = {
    "allow": build_allow_response,
    # gRPC code 7 is PERMISSION_DENIED and code 14 is UNAVAILABLE.
    "deny_401": lambda: build_deny_response(
        7, http_status_pb2.Unauthorized, "token expired", '{"error": "invalid_token"}'
    ),
    "deny_503": lambda: build_deny_response(
        14, http_status_pb2.ServiceUnavailable, "issuer unreachable", "service unavailable"
    ),
    "error": build_error_response,
}


def test_check_request_from_xds_protos(xds_protos_path: Path) -> None:
    output = run_xds_program(xds_protos_path, "build_request", values=REQUEST_VALUES)
    request = external_auth_pb2.CheckRequest.FromString(decode(output["data"]))
    attributes = request.attributes
    values = REQUEST_VALUES

    assert unknown_field_bytes(request) == 0

    source = attributes.source
    assert source.address.WhichOneof("address") == "socket_address"
    assert source.address.socket_address.address == values["source_address"]
    assert source.address.socket_address.WhichOneof("port_specifier") == "port_value"
    assert source.address.socket_address.port_value == values["source_port"]
    assert source.principal == values["source_principal"]
    destination = attributes.destination.address.socket_address
    assert destination.address == values["destination_address"]
    assert destination.port_value == values["destination_port"]

    assert attributes.request.time.seconds == values["time_seconds"]
    assert attributes.request.time.nanos == values["time_nanos"]
    http = attributes.request.http
    assert http.id == values["request_id"]
    assert http.method == values["method"]
    assert dict(http.headers) == values["headers"]
    assert http.headers["authorization"] == "Bearer header.payload.signature"
    assert http.path == values["path"]
    assert http.host == values["host"]
    assert http.scheme == values["scheme"]
    assert http.protocol == values["protocol"]
    assert http.size == values["size"]
    assert http.body == values["body"]
    assert http.raw_body == decode(values["raw_body_base64"])
    header_map = [[header.key, header.raw_value.decode()] for header in http.header_map.headers]
    assert header_map == values["header_map"]
    assert all(header.value == "" for header in http.header_map.headers)

    assert dict(attributes.context_extensions) == {"policy": "default"}
    metadata = attributes.metadata_context.filter_metadata
    assert list(metadata) == [values["metadata_filter"]]
    assert to_dict(metadata[values["metadata_filter"]]) == values["metadata"]
    route_metadata = attributes.route_metadata_context.filter_metadata
    assert to_dict(route_metadata[values["route_metadata_filter"]]) == values["route_metadata"]
    assert attributes.tls_session.sni == values["sni"]


def test_check_request_to_xds_protos(xds_protos_path: Path) -> None:
    built = run_xds_program(xds_protos_path, "build_request", values=REQUEST_VALUES)
    ours = external_auth_pb2.CheckRequest.FromString(decode(built["data"]))

    output = run_xds_program(
        xds_protos_path, "compare_request", values=REQUEST_VALUES, data=encode(ours)
    )

    assert output["unknown_field_bytes"] == 0
    assert output["equal"], "xds-protos parsed a different CheckRequest from our serialization"


@pytest.mark.parametrize("case", sorted(RESPONSE_CASES))
def test_check_response_to_xds_protos(xds_protos_path: Path, case: str) -> None:
    response = RESPONSE_CASES[case]()

    output = run_xds_program(xds_protos_path, "round_trip_response", data=encode(response))

    assert output["unknown_field_bytes"] == 0
    assert output["http_response"] == response.WhichOneof("http_response")
    assert output["dict"] == to_dict(response)


@pytest.mark.parametrize("case", sorted(RESPONSE_CASES))
def test_check_response_from_xds_protos(xds_protos_path: Path, case: str) -> None:
    response = RESPONSE_CASES[case]()
    output = run_xds_program(xds_protos_path, "round_trip_response", data=encode(response))

    # The subprocess serialized the message that it parsed, so this is xds-protos output.
    parsed = external_auth_pb2.CheckResponse.FromString(decode(output["data"]))

    assert unknown_field_bytes(parsed) == 0
    assert parsed.WhichOneof("http_response") == response.WhichOneof("http_response")
    assert to_dict(parsed) == output["dict"]
    assert parsed == response


def list_top_level_types() -> tuple[list[Descriptor], list[EnumDescriptor]]:
    messages: list[Descriptor] = []
    enums: list[EnumDescriptor] = []
    for module in OUR_PROTO_MODULES:
        messages.extend(module.DESCRIPTOR.message_types_by_name.values())
        enums.extend(module.DESCRIPTOR.enum_types_by_name.values())
    return messages, enums


def summarize_enum(enum: descriptor_pb2.EnumDescriptorProto) -> dict[str, Any]:
    return {
        "values": [(value.name, value.number) for value in enum.value],
        "reserved_ranges": [(r.start, r.end) for r in enum.reserved_range],
        "reserved_names": list(enum.reserved_name),
    }


def summarize_message(message: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    """Return the parts of a message definition that decide its wire format and JSON form.

    Comments, options other than `deprecated`, and validation annotations are left out.
    Fields are keyed by name, so declaration order does not matter.
    """
    fields = {}
    for field in message.field:
        oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else ""
        fields[field.name] = {
            "number": field.number,
            "label": field.label,
            "type": field.type,
            "type_name": field.type_name,
            "oneof": oneof,
            "proto3_optional": field.proto3_optional,
            "deprecated": field.options.deprecated,
        }
    return {
        "fields": fields,
        "nested_messages": {
            nested.name: summarize_message(nested) for nested in message.nested_type
        },
        "nested_enums": {nested.name: summarize_enum(nested) for nested in message.enum_type},
        "reserved_ranges": [(r.start, r.end) for r in message.reserved_range],
        "reserved_names": list(message.reserved_name),
    }


def test_descriptors_match_xds_protos(xds_protos_path: Path) -> None:
    messages, enums = list_top_level_types()
    output = run_xds_program(
        xds_protos_path,
        "describe",
        messages=[message.full_name for message in messages],
        enums=[enum.full_name for enum in enums],
    )

    for message in messages:
        ours = descriptor_pb2.DescriptorProto()
        message.CopyToProto(ours)
        theirs = descriptor_pb2.DescriptorProto.FromString(
            decode(output["messages"][message.full_name])
        )
        assert summarize_message(ours) == summarize_message(theirs), message.full_name

    for enum in enums:
        ours_enum = descriptor_pb2.EnumDescriptorProto()
        enum.CopyToProto(ours_enum)
        theirs_enum = descriptor_pb2.EnumDescriptorProto.FromString(
            decode(output["enums"][enum.full_name])
        )
        assert summarize_enum(ours_enum) == summarize_enum(theirs_enum), enum.full_name
