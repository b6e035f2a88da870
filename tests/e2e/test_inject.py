"""`sidecar inject`: real-world manifests in (multi-document YAML, a JSON `List`, CronJobs and
Jobs, hostNetwork and opted-out pods, already-injected output), golden files out; every output
validates with `kubernetes-validate --strict`; injecting twice equals once; bad input is a
clear error naming the document and field, exit status 1 and nothing on stdout.

Golden files: tests/e2e/golden/inject/NAME.yaml in, NAME.golden.yaml out. After a deliberate
change, rewrite them with SIDECAR_UPDATE_GOLDEN=1 and read the diff."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import SIDECAR_BIN
from k8s_helpers import assert_every_document_validates, documents

GOLDEN = Path(__file__).parent / "golden" / "inject"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml") if not p.stem.endswith(".golden"))


def inject(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SIDECAR_BIN), "inject", *args], input=input, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("case", CASES)
def test_output_matches_the_golden_file_and_validates(case, tmp_path):
    p = inject("-f", str(GOLDEN / f"{case}.yaml"))
    assert p.returncode == 0, p.stderr
    golden = GOLDEN / f"{case}.golden.yaml"
    if os.environ.get("SIDECAR_UPDATE_GOLDEN") == "1":
        golden.write_text(p.stdout)
    assert p.stdout == golden.read_text(), f"{case}: output differs from {golden.name} (SIDECAR_UPDATE_GOLDEN=1 rewrites it)"
    assert_every_document_validates(tmp_path, unlisted(p.stdout), case)


def unlisted(text: str) -> str:
    """The documents with each `List` replaced by its items: the schemas have no `List`."""
    out = []
    for d in documents(text):
        out.extend(d["items"] if d["kind"] == "List" else [d])
    return yaml.safe_dump_all(out)


@pytest.mark.parametrize("case", CASES)
def test_injecting_twice_equals_injecting_once(case):
    once = inject("-f", str(GOLDEN / f"{case}.yaml"))
    twice = inject("-f", "-", input=once.stdout)
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout == once.stdout


def test_the_report_names_every_object_and_what_was_done():
    p = inject("-f", str(GOLDEN / "multi.yaml"), "-f", str(GOLDEN / "list.yaml"))
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [
        "configmap/sidecar-config passed through (no pod spec)",
        "deployment/web injected",
        "service/web passed through (no pod spec)",
        "statefulset/db-proxy injected",
        "daemonset/log-agent skipped: hostNetwork: the sidecar's ports would be the node's",
        "pod/debug injected",
        "replicaset/api-7d9f injected",
        "pod/legacy skipped: annotated sidecar.dev/inject: disabled",
        "sidecar inject: 4 of 8 objects injected",
    ]


def test_what_injection_adds(tmp_path):
    docs = documents(inject("-f", str(GOLDEN / "multi.yaml")).stdout)
    web = next(d for d in docs if d["kind"] == "Deployment")
    spec = web["spec"]["template"]["spec"]
    sidecar, migrate = spec["initContainers"]
    # First, so it is up before the app's own init containers and the app.
    assert (sidecar["name"], sidecar["restartPolicy"], migrate["name"]) == ("sidecar", "Always", "migrate")
    assert [c["name"] for c in spec["containers"]] == ["web"]
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/live", "port": 15000}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15000}
    assert [p["containerPort"] for p in sidecar["ports"]] == [15000, 15006, 15443]
    assert {m["mountPath"] for m in sidecar["volumeMounts"]} == {"/etc/sidecar/config", "/etc/sidecar/tls"}
    assert {"name": "sidecar-tls", "secret": {"secretName": "web-tls"}} in spec["volumes"]
    assert {"name": "cache", "emptyDir": {}} in spec["volumes"]
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    db = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    assert db["initContainers"][0]["resources"] == {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "32Mi"}}
    assert {"name": "sidecar-config", "configMap": {"name": "db-proxy-sidecar"}} in db["volumes"]


def test_no_native_puts_a_plain_container_first_for_older_clusters(tmp_path):
    p = inject("--no-native", "-f", str(GOLDEN / "multi.yaml"))
    assert p.returncode == 0, p.stderr
    web = next(d for d in documents(p.stdout) if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in web["containers"]] == ["sidecar", "web"]
    assert "restartPolicy" not in web["containers"][0]
    assert [c["name"] for c in web["initContainers"]] == ["migrate"]
    assert_every_document_validates(tmp_path, p.stdout, "no-native")
    # Switching back moves it rather than adding a second one.
    native = inject("-f", "-", input=p.stdout)
    assert native.stdout == inject("-f", str(GOLDEN / "multi.yaml")).stdout


def test_a_directory_is_read_in_name_order_and_stdin_works(tmp_path):
    d = tmp_path / "manifests"
    (d / "sub").mkdir(parents=True)
    (d / "b.yml").write_text((GOLDEN / "jobs.yaml").read_text())
    (d / "sub" / "c.json").write_text((GOLDEN / "list.yaml").read_text())
    (d / "a.yaml").write_text((GOLDEN / "multi.yaml").read_text())
    (d / "notes.txt").write_text("not a manifest")
    p = inject("-f", str(d))
    assert p.returncode == 0, p.stderr
    want = "---\n".join(inject("-f", str(GOLDEN / f)).stdout for f in ("multi.yaml", "jobs.yaml", "list.yaml"))
    assert p.stdout == want
    assert inject("-f", "-", input=(GOLDEN / "jobs.yaml").read_text()).stdout == inject("-f", str(GOLDEN / "jobs.yaml")).stdout


@pytest.mark.parametrize(
    "text, message",
    [
        ("apiVersion: v1\nkind: Pod\nmetadata: { name: a\n", "<stdin>: document 1: not valid YAML: "),
        (
            "apiVersion: v1\nkind: Service\nmetadata: { name: s }\n---\nkind: Deployment\nmetadata: { name: web }\n",
            "<stdin>: document 2 (deployment/web): apiVersion: missing, or not a string",
        ),
        (
            "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: { name: web }\n",
            "<stdin>: document 1 (deployment/web): apiVersion: `extensions/v1beta1` Deployment is not supported: use apps/v1",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec: { containers: [{ name: a, ports: [{ containerPort: http }] }] }\n",
            "<stdin>: document 1 (pod/p): spec.containers[0].ports[0].containerPort: invalid type: string \"http\", expected i32",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: { name: p, annotations: { sidecar.dev/admin-port: \"99999\" } }\nspec: { containers: [{ name: a }] }\n",
            "<stdin>: document 1 (pod/p): metadata.annotations.sidecar.dev/admin-port: `99999` is not a port (1-65535)",
        ),
    ],
)
def test_bad_input_names_the_document_and_field_and_writes_nothing(text, message):
    # The second case has a good document first: nothing of it may reach stdout.
    p = inject("-f", "-", input=text)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.startswith("sidecar inject: " + message), p.stderr


def test_a_missing_file_is_an_error():
    p = inject("-f", "/nonexistent/deploy.yaml")
    assert (p.returncode, p.stdout) == (1, "")
    assert "sidecar inject: /nonexistent/deploy.yaml: cannot read: " in p.stderr
