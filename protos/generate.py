"""Generate the Python stubs of ``protos/*.proto`` with grpcio-tools: ``python -m protos.generate [OUT_ROOT]``.

Stubs are written under ``OUT_ROOT/protos/`` (default: the repository root, i.e. next to the .proto files) and
import each other as ``protos.<name>_pb2``. ``tests/unit/test_scaler_protos.py`` regenerates into a temporary
directory and compares, so a stub that drifts from its .proto fails the tests.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("externalscaler.proto",)


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto; return the files written."""
    from grpc_tools import protoc

    out_root = Path(out_root)
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")
    written: list[Path] = []
    for name in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS_DIR.parent}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(PROTOS_DIR / name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")
        stem = name.removesuffix(".proto")
        written += [out_root / "protos" / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2_grpc.py")]
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else PROTOS_DIR.parent
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
