"""Regenerate the Python stubs of every .proto file in this package (needs grpcio-tools)."""

from pathlib import Path


def main() -> None:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    root = here.parent
    protos = sorted(str(p.relative_to(root)) for p in here.glob("*.proto"))
    args = ["protoc", f"-I{root}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    print("generated stubs for", ", ".join(protos))


if __name__ == "__main__":
    main()
