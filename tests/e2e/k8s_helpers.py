"""Kubernetes YAML for the tests: rendering with `kubectl kustomize` (offline) and validating
with `kubernetes-validate --strict` against the published schemas."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Native sidecars need >= 1.29; validate against a release where they are on by default and
# a Service can also name their ports (1.33, see deploy/base/service.yaml).
KUBE_VERSION = "1.33"


def kustomize(path: Path) -> str:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed (needed for `kubectl kustomize`, which works offline)")
    p = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"kubectl kustomize {path} failed:\n{p.stderr}"
    return p.stdout


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate(tmp_path: Path, text: str, name: str) -> tuple[int, str]:
    """Runs `kubernetes-validate --strict` on the rendered YAML; (exit status, output)."""
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: run scripts/install-test-deps")
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    p = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, str(f)],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


def assert_every_document_validates(tmp_path: Path, text: str, name: str):
    rc, out = validate(tmp_path, text, name)
    docs = documents(text)
    passed = [line for line in out.splitlines() if line.startswith("INFO ") and f"against version {KUBE_VERSION}" in line]
    # A kind without a schema is only a WARN with exit status 0: count the passes instead.
    others = [line for line in out.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert rc == 0 and not others, f"kubernetes-validate --strict -k {KUBE_VERSION} ({name}), status {rc}:\n{out}"
    assert len(passed) == len(docs), f"{len(docs)} documents, {len(passed)} validated:\n{out}"
