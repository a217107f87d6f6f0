"""The installed distribution: the design's folders install as ``kvmesh.*``, nothing
claims a generic top-level name, and the source tree imports itself only that way."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("kv_store", "engine_host", "prefill_workers", "decode_workers", "router", "cluster", "bench")
ALLOWED_TOP_LEVEL = {"kvmesh", "kvmesh_client", "kvmesh_proto"}


def _packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_the_wheel_claims_no_generic_top_level_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("kvmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == ALLOWED_TOP_LEVEL, top
    for generic in ("router", "cluster", "bench", "engine_host", "tests", "kv_store"):
        assert not any(n.startswith(generic + "/") for n in names), generic
    assert "kvmesh/engine_host/connector.py" in names and "kvmesh/cluster/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "kvmesh = kvmesh.cluster.cli:main" in text


def test_every_package_folder_is_installed():
    """A new subfolder with an ``__init__.py`` must be listed, or the wheel lacks it."""
    listed = set(_packages())
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        top = rel.parts[0]
        if top in FOLDERS:
            assert "kvmesh." + ".".join(rel.parts) in listed, rel
        elif top in ("kvmesh_client", "kvmesh_proto"):
            assert ".".join(rel.parts) in listed, rel


def test_the_tree_imports_itself_only_as_kvmesh():
    """``import router`` would load a second copy of a module beside ``kvmesh.router``."""
    bare = re.compile(rf"^\s*(from|import)\s+({'|'.join(FOLDERS)})(\.|\s|$)", re.M)
    offenders = []
    for path in ROOT.rglob("*.py"):
        if {".venv", ".git", "build"} & set(path.relative_to(ROOT).parts):
            continue
        for m in bare.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    assert not offenders, offenders
