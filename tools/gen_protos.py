"""Generate the Python code under ext_authz/api from the .proto files under protos/.

Usage: python tools/gen_protos.py [--out DIR]

The output directory defaults to the repository root, so a plain run rewrites the
committed code. The test suite passes a temporary directory and compares the result
with the committed files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
# Package that contains the generated code, relative to both PROTO_ROOT and the output directory.
API_PACKAGE = Path("ext_authz") / "api"
# Only files that declare a service get gRPC stubs.
GRPC_PROTOS = frozenset({"ext_authz/api/envoy/service/auth/v3/external_auth.proto"})
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def find_protos(proto_root: Path) -> list[str]:
    """Return the .proto paths under proto_root, relative to it, in sorted order."""
    return sorted(path.relative_to(proto_root).as_posix() for path in proto_root.rglob("*.proto"))


def well_known_types_dir() -> Path:
    """Return the include directory of the well-known types bundled with grpcio-tools."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def run_protoc(args: list[str]) -> None:
    """Run protoc in this process and raise RuntimeError if it reports a failure."""
    # protoc.main takes argv, so the first element is the program name.
    status = protoc.main(["grpc_tools.protoc", *args])
    if status != 0:
        raise RuntimeError(
            f"protoc failed with exit status {status}, see its errors above. "
            f"Arguments: {' '.join(args)}"
        )


def generate(out_dir: Path) -> None:
    """Write the _pb2.py, _pb2.pyi and _pb2_grpc.py files for every proto into out_dir.

    protoc writes into a temporary directory first, so a failed run leaves out_dir unchanged.
    """
    protos = find_protos(PROTO_ROOT)
    if not protos:
        raise RuntimeError(f"no .proto files found under {PROTO_ROOT}")
    includes = [f"--proto_path={PROTO_ROOT}", f"--proto_path={well_known_types_dir()}"]
    grpc_protos = [proto for proto in protos if proto in GRPC_PROTOS]

    with tempfile.TemporaryDirectory(prefix="gen_protos-") as staging:
        staging_dir = Path(staging)
        # One protoc call for all files keeps the output independent of call order.
        run_protoc([*includes, f"--python_out={staging_dir}", f"--pyi_out={staging_dir}", *protos])
        if grpc_protos:
            run_protoc([*includes, f"--grpc_python_out={staging_dir}", *grpc_protos])
        add_init_files(staging_dir / API_PACKAGE)

        out_dir.mkdir(parents=True, exist_ok=True)
        remove_generated_files(out_dir / API_PACKAGE)
        shutil.copytree(staging_dir, out_dir, dirs_exist_ok=True)


def remove_generated_files(api_dir: Path) -> None:
    """Delete earlier protoc output in api_dir, so that code of a removed .proto goes away too."""
    if not api_dir.is_dir():
        return
    for path in sorted(api_dir.rglob("*.py*")):
        if path.name == "__init__.py" or path.name.endswith(GENERATED_SUFFIXES):
            path.unlink()


def add_init_files(api_dir: Path) -> None:
    """Create an empty __init__.py in api_dir and in every directory below it."""
    package_dirs = [api_dir, *(path for path in api_dir.rglob("*") if path.is_dir())]
    for package_dir in sorted(package_dirs):
        if "__pycache__" in package_dir.parts:
            continue
        (package_dir / "__init__.py").write_bytes(b"")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate the Python code under ext_authz/api from protos/."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="directory to write ext_authz/api into (default: the repository root)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        generate(args.out.resolve())
    except RuntimeError as error:
        print(f"gen_protos: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
