"""`sidecar webhook`: AdmissionReview v1 requests as the API server sends them (a Pod CREATE with
a generated name, a Deployment's pod template, dry-run), over TLS with the CA from
`sidecar certs`, HTTP/1.1 and HTTP/2. The returned JSON Patch, applied with the `jsonpatch`
library, gives exactly what `sidecar inject` gives, and validates against the schemas; a second
pass (reinvocationPolicy: IfNeeded) patches nothing. Malformed reviews get 400 with a reason and
the webhook stays up; one it cannot handle is answered by its failure policy, never left
hanging; SIGTERM drains and exits 0."""

from __future__ import annotations

import base64
import copy
import json
import signal
import socket
import ssl
import subprocess
import time
import uuid

import httpx
import jsonpatch
import pytest
import yaml

from helpers import LOCALHOST, SIDECAR_BIN, Metrics, free_port, http_request, run_sidecar_cmd, wait_until
from k8s_helpers import assert_every_document_validates, documents

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"generateName": "web-7d9f-", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {"containers": [{"name": "web", "image": "shop/web:1.4", "ports": [{"containerPort": 8080}]}]},
}

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}, "annotations": {"sidecar.dev/tls-secret": "web-tls"}},
            "spec": {"containers": [{"name": "web", "image": "shop/web:1.4"}]},
        },
    },
}


def review(obj: dict, *, operation="CREATE", dry_run=False) -> dict:
    """An AdmissionReview the way kube-apiserver sends it."""
    group, _, version = obj["apiVersion"].rpartition("/")
    resource = {"Pod": "pods", "Deployment": "deployments"}[obj["kind"]]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": obj["kind"]},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": obj["kind"]},
            "requestResource": {"group": group, "version": version, "resource": resource},
            "name": obj["metadata"].get("name", ""),
            "namespace": obj["metadata"].get("namespace", "default"),
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": obj,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


class Webhook:
    def __init__(self, proc, port, admin, ca):
        self.proc, self.port, self.admin, self.ca = proc, port, admin, ca
        self.client = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10)
        self.h2 = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10, http2=True)

    def post(self, body, path="/inject", http2=False, headers=None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})}
        return (self.h2 if http2 else self.client).post(f"https://localhost:{self.port}{path}", content=content, headers=hdrs)

    def answer(self, obj, path="/inject", **kw) -> dict:
        sent = review(obj, **{k: v for k, v in kw.items() if k in ("operation", "dry_run")})
        r = self.post(sent, path, http2=kw.get("http2", False))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
        assert out["response"]["uid"] == sent["request"]["uid"]
        return out["response"]

    def metrics(self) -> Metrics:
        return Metrics(http_request(self.admin, "/metrics").body.decode())


def patched(obj: dict, response: dict) -> dict:
    assert response["allowed"] is True
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(copy.deepcopy(obj), ops)


def injected_by_cli(obj: dict) -> dict:
    p = subprocess.run([str(SIDECAR_BIN), "inject", "-f", "-"], input=yaml.safe_dump(obj), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    (doc,) = documents(p.stdout)
    return doc


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("webhook-pki")
    assert run_sidecar_cmd("certs", "init", d / "ca").returncode == 0
    p = run_sidecar_cmd("certs", "issue", "--ca", d / "ca", "--spiffe", "spiffe://cluster.local/ns/sidecar-system/sa/sidecar-webhook",
                        "--dns", "localhost", "--dns", "sidecar-webhook.sidecar-system.svc", d / "tls")
    assert p.returncode == 0, p.stderr
    return d


def start_webhook(tmp_path, pki, policy="ignore", timeout="2s") -> Webhook:
    port, admin = free_port(), free_port()
    cfg = tmp_path / f"webhook-{policy}.yaml"
    cfg.write_text(yaml.safe_dump({
        "webhook": {"listen": f"{LOCALHOST}:{port}", "tls": {"cert": str(pki / "tls" / "tls.crt"), "key": str(pki / "tls" / "tls.key")},
                    "failure_policy": policy, "request_timeout": timeout},
        "admin": {"listen": f"{LOCALHOST}:{admin}"},
    }))
    proc = subprocess.Popen([str(SIDECAR_BIN), "webhook", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: _ready(admin), 10, what="webhook /ready")
    return Webhook(proc, port, admin, pki / "tls" / "ca.crt")


def _ready(admin) -> bool:
    try:
        return http_request(admin, "/ready", timeout=1).status == 200
    except OSError:
        return False


@pytest.fixture
def webhook(tmp_path, pki):
    w = start_webhook(tmp_path, pki)
    yield w
    if w.proc.poll() is None:
        w.proc.kill()
    w.proc.wait()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_a_pod_create_is_patched_to_exactly_what_inject_gives(webhook, tmp_path, http2):
    response = webhook.answer(POD, http2=http2)
    result = patched(POD, response)
    assert result == injected_by_cli(POD)
    assert result["spec"]["initContainers"][0]["name"] == "sidecar"
    # The API server names the pod from generateName before it stores it; so does the check.
    named = copy.deepcopy(result)
    named["metadata"]["name"] = "web-7d9f-x2k8q"
    assert_every_document_validates(tmp_path, yaml.safe_dump(named), "webhook-pod")
    # The API server calls again under reinvocationPolicy: IfNeeded: nothing more to do.
    again = webhook.answer(result)
    assert again["allowed"] and "patch" not in again


def test_a_deployments_pod_template_and_a_dry_run(webhook, tmp_path):
    result = patched(DEPLOYMENT, webhook.answer(DEPLOYMENT, dry_run=True))
    assert result == injected_by_cli(DEPLOYMENT)
    spec = result["spec"]["template"]["spec"]
    assert {"name": "sidecar-tls", "secret": {"secretName": "web-tls"}} in spec["volumes"]
    assert_every_document_validates(tmp_path, yaml.safe_dump(result), "webhook-deployment")


def test_opt_outs_and_the_annotated_path(webhook):
    disabled = copy.deepcopy(POD)
    disabled["metadata"]["annotations"] = {"sidecar.dev/inject": "disabled"}
    assert "patch" not in webhook.answer(disabled)
    host = copy.deepcopy(POD)
    host["spec"]["hostNetwork"] = True
    assert "patch" not in webhook.answer(host)
    # /inject-annotated serves namespaces without the label: only pods that ask are injected.
    assert "patch" not in webhook.answer(POD, path="/inject-annotated")
    asking = copy.deepcopy(POD)
    asking["metadata"]["annotations"] = {"sidecar.dev/inject": "enabled"}
    assert patched(asking, webhook.answer(asking, path="/inject-annotated")) == injected_by_cli(asking)
    m = webhook.metrics()
    assert m.value("sidecar_webhook_requests_total", result="skipped") == 3
    assert m.value("sidecar_webhook_requests_total", result="injected") == 1


def test_malformed_reviews_get_400_with_a_reason_and_the_webhook_stays_up(webhook):
    for body, status, reason in [
        (b"{not json", 400, "not an admission.k8s.io/v1 AdmissionReview"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), 400, "has no request"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 5}}).encode(), 400, "AdmissionReview"),
    ]:
        r = webhook.post(body)
        assert (r.status_code, reason in r.text) == (status, True), r.text
    assert webhook.post(POD, headers={"content-type": "text/plain"}).status_code == 415
    assert webhook.client.get(f"https://localhost:{webhook.port}/inject").status_code == 405
    assert webhook.post(b"x" * (9 << 20)).status_code == 413
    assert webhook.metrics().value("sidecar_webhook_requests_total", result="invalid") == 5
    assert webhook.answer(POD)["allowed"]
    assert http_request(webhook.admin, "/ready").status == 200


def test_a_stalled_body_is_answered_within_the_timeout_and_others_carry_on(webhook):
    ctx = ssl.create_default_context(cafile=str(webhook.ca))
    raw = ctx.wrap_socket(socket.create_connection((LOCALHOST, webhook.port)), server_hostname="localhost")
    raw.sendall(b"POST /inject HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"apiVersion\"")
    started = time.monotonic()
    assert webhook.answer(POD)["allowed"], "another review is answered while one stalls"
    raw.settimeout(10)
    head = raw.recv(4096)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert time.monotonic() - started < 5, "answered at request_timeout (2s), not left hanging"
    raw.close()


@pytest.mark.parametrize("policy", ["ignore", "fail"])
def test_a_review_it_cannot_handle_is_answered_by_the_failure_policy(tmp_path, pki, policy):
    w = start_webhook(tmp_path, pki, policy=policy)
    try:
        bad = copy.deepcopy(POD)
        bad["metadata"]["annotations"] = {"sidecar.dev/admin-port": "admin"}
        r = w.answer(bad)
        if policy == "ignore":
            assert r["allowed"] is True and "patch" not in r
            assert "sidecar.dev/admin-port" in r["warnings"][0]
        else:
            assert r["allowed"] is False
            assert "metadata.annotations.sidecar.dev/admin-port: `admin` is not a port" in r["status"]["message"]
        assert w.metrics().value("sidecar_webhook_requests_total", result="error") == 1
    finally:
        w.proc.kill()
        w.proc.wait()


def test_sigterm_drains_and_exits_0(webhook):
    assert webhook.answer(POD)["allowed"]
    webhook.proc.send_signal(signal.SIGTERM)
    assert webhook.proc.wait(timeout=15) == 0
    out = webhook.proc.stdout.read()
    assert "webhook draining" in out


def test_a_bad_webhook_file_names_every_field(tmp_path):
    cfg = tmp_path / "webhook.yaml"
    cfg.write_text("webhook: { tls: { cert: tls.crt }, failure_policy: sometimes }\n")
    p = subprocess.run([str(SIDECAR_BIN), "webhook", "-c", str(cfg)], capture_output=True, text=True, timeout=10)
    assert p.returncode != 0
    assert "webhook.failure_policy: unknown variant `sometimes`" in p.stderr
