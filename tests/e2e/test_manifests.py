"""deploy/: the kustomize base (an app with Sidecar as a native sidecar) and the injection
webhook render offline with `kubectl kustomize`, every document validates against the
Kubernetes 1.33 schemas with `kubernetes-validate --strict`, and what makes them work holds:
the sidecar starts first and stops last, probes reach the admin port, the grace period outlasts
the drain, Pod Security "restricted", the Service and the webhook point where the configs
listen. Every sidecar.yaml under deploy/ passes the real `sidecar check`."""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT, run_sidecar_cmd
from k8s_helpers import KUBE_VERSION, assert_every_document_validates, documents, kustomize, validate

DEPLOY = REPO_ROOT / "deploy"

ADMIN_PORT = 15000
WEBHOOKS = {
    "namespace.inject.sidecar.dev": "/inject",
    "annotated.inject.sidecar.dev": "/inject-annotated",
}


@pytest.fixture(scope="module")
def base_yaml() -> str:
    return kustomize(DEPLOY / "base")


@pytest.fixture(scope="module")
def webhook_yaml() -> str:
    return kustomize(DEPLOY / "webhook")


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)} among {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


# --------------------------------------------------------------------------------------------
# small readers: durations, ports, label selectors, Pod Security
# --------------------------------------------------------------------------------------------
def seconds(duration: str) -> float:
    """`20s`, `500ms`, `1m30s` -> seconds (Sidecar's duration strings)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration.replace(" ", ""), f"unparsed duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a label set."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What breaks the Pod Security Standards' "restricted" profile (baseline included, the
    Linux checks), and a writable root filesystem, which this project also refuses."""
    bad = []
    psc = pod.get("securityContext") or {}
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(f):
            bad.append(f"pod: {f}")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad.append(f"volume {v['name']}: type {kinds - RESTRICTED_VOLUME_TYPES}")
    if psc.get("runAsUser") == 0:
        bad.append("pod: runAsUser 0")
    if (psc.get("seccompProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"pod: seccompProfile {psc['seccompProfile']}")
    containers = [("initContainers", c) for c in pod.get("initContainers") or []] + [("containers", c) for c in pod["containers"]]
    for where, c in containers:
        at = f"{where}/{c['name']}"
        sc = c.get("securityContext") or {}
        run_as_non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if run_as_non_root is not True:
            bad.append(f"{at}: runAsNonRoot is {run_as_non_root}")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{at}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{at}: seccompProfile {seccomp}")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{at}: allowPrivilegeEscalation is {sc.get('allowPrivilegeEscalation')}")
        if sc.get("privileged"):
            bad.append(f"{at}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{at}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{at}: capabilities.add {caps['add']}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{at}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{at}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{at}: readOnlyRootFilesystem is {sc.get('readOnlyRootFilesystem')}")
    return bad


def mounted_volume(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The volume mounted at `path` (or the deepest mount above it) in `container`: (mount, volume)."""
    mounts = [m for m in container.get("volumeMounts") or [] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"nothing is mounted at {path} in container {container['name']}"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    assert m["name"] in vols, f"mount {m} names no volume"
    return m, vols[m["name"]]


# --------------------------------------------------------------------------------------------
# deploy/base
# --------------------------------------------------------------------------------------------
class Base:
    def __init__(self, text: str):
        self.docs = documents(text)
        self.deployment = one(self.docs, "Deployment", "web")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.annotations = self.deployment["spec"]["template"]["metadata"].get("annotations") or {}
        self.sidecar = self.pod["initContainers"][0]
        self.app = self.pod["containers"][0]
        self.config_map = one(self.docs, "ConfigMap", "sidecar-config")
        self.config = yaml.safe_load(self.config_map["data"]["sidecar.yaml"])
        self.service = one(self.docs, "Service", "web")

    def container_port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.sidecar["ports"] if p["name"] == name)


@pytest.fixture(scope="module")
def base(base_yaml) -> Base:
    return Base(base_yaml)


def test_base_renders_and_every_document_validates_strictly(base_yaml, tmp_path):
    assert_every_document_validates(tmp_path, base_yaml, "base")
    kinds = sorted(d["kind"] for d in documents(base_yaml))
    assert kinds == ["ConfigMap", "Deployment", "Service"], kinds


def test_strict_validation_catches_a_misspelled_field(base_yaml, tmp_path):
    # The check above can fail: one typo in the sidecar container is refused.
    docs = documents(base_yaml)
    broken = copy.deepcopy(docs)
    dep = next(d for d in broken if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    rc, out = validate(tmp_path, yaml.safe_dump_all(broken), "broken")
    assert rc != 0 and "ERROR" in out and "deployment/web" in out, out


def test_sidecar_is_the_first_init_container_and_restarts_always(base):
    assert base.sidecar["name"] == "sidecar"
    assert base.sidecar["restartPolicy"] == "Always"
    assert "restartPolicy" not in base.app
    assert base.sidecar["args"] == ["run", "-c", "/etc/sidecar/config/sidecar.yaml"]
    assert base.sidecar["image"] == base.app["image"] == "sidecar:0.1.0"
    assert base.app["args"][:1] == ["demo-app"]
    env = {e["name"]: e for e in base.sidecar["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["CONTAINER_NAME"]["value"] == base.app["name"]


def test_probes_and_scraping_reach_the_admin_port(base):
    admin = port_of(base.config["admin"]["listen"])
    assert admin == ADMIN_PORT and base.config["admin"]["listen"].startswith("0.0.0.0:"), \
        "the kubelet probes the pod IP: admin must listen beyond loopback"
    assert base.container_port("sidecar-admin") == admin
    s = base.sidecar
    assert s["startupProbe"]["httpGet"] == {"path": "/live", "port": admin}, "startup on /ready would wait for an app that starts after it"
    assert s["livenessProbe"]["httpGet"] == {"path": "/live", "port": admin}
    assert s["readinessProbe"]["httpGet"] == {"path": "/ready", "port": admin}
    assert s["lifecycle"]["preStop"]["exec"]["command"] == ["/sidecar", "drain", "--announce"]
    assert base.annotations["prometheus.io/scrape"] == "true"
    assert base.annotations["prometheus.io/port"] == str(admin)
    assert base.annotations["prometheus.io/path"] == "/metrics"
    # The webhook must leave this hand-written sidecar alone.
    assert base.annotations["sidecar.dev/inject"] == "disabled"


def test_grace_period_outlasts_drain_delay_plus_drain_timeout(base):
    shutdown = base.config["shutdown"]
    delay, timeout = seconds(shutdown["drain_delay"]), seconds(shutdown["drain_timeout"])
    assert delay > 0, "the manifests keep serving while endpoints update (drain_delay)"
    grace = base.pod["terminationGracePeriodSeconds"]
    assert grace > delay + timeout, f"terminationGracePeriodSeconds {grace} <= drain_delay {delay} + drain_timeout {timeout}"
    app_sleep = (base.app.get("lifecycle") or {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert app_sleep < grace


def test_pod_meets_pod_security_restricted(base):
    assert restricted_violations(base.pod) == []
    assert base.pod["automountServiceAccountToken"] is False


def test_sidecar_resources_are_the_benchmark_derived_ones(base):
    assert base.sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}


def test_config_tls_and_log_volumes_are_mounted_where_the_config_says(base):
    pod, s = base.pod, base.sidecar
    # The config: the ConfigMap kustomize generated, under its own name (no hash suffix).
    m, v = mounted_volume(pod, s, "/etc/sidecar/config/sidecar.yaml")
    assert m["readOnly"] is True and v["configMap"]["name"] == base.config_map["metadata"]["name"] == "sidecar-config"
    # TLS: every file a listener names comes from the Secret sidecar-tls, which is not in git.
    tls_files = [f for listener in base.config["inbound"] if "tls" in listener
                 for k, f in listener["tls"].items() if k in ("cert", "key", "client_ca")]
    assert len(tls_files) == 3, base.config["inbound"]
    for f in tls_files:
        m, v = mounted_volume(pod, s, f)
        assert m["mountPath"] == "/etc/sidecar/tls" and m["readOnly"] is True and v["secret"]["secretName"] == "sidecar-tls", (f, m, v)
    assert not [d for d in base.docs if d["kind"] == "Secret"], "no keys in git: the Secret is made by hand"
    # Log shipping: the app's log directory, shared read-only, and checkpoints in an emptyDir.
    logship = base.config["logship"]
    paths = [p for src in logship["sources"] for p in src["paths"]]
    assert paths == ["/var/log/app/*.log"]
    log_file = base.app["args"][base.app["args"].index("--log-file") + 1]
    m_app, v_app = mounted_volume(pod, base.app, log_file)
    m_sc, v_sc = mounted_volume(pod, s, log_file)
    assert v_app is v_sc and "emptyDir" in v_app and m_sc["readOnly"] is True
    m, v = mounted_volume(pod, s, logship["checkpoint_dir"] + "/logship.json")
    assert "emptyDir" in v and not m.get("readOnly"), (m, v)
    assert logship["checkpoint_dir"] == "/var/lib/sidecar"


def test_app_health_path_and_address(base):
    app = base.config["app"]
    assert app["address"] == "127.0.0.1:8080" and app["health"]["path"] == "/healthz"
    listen = base.app["args"][base.app["args"].index("--listen") + 1]
    assert listen == app["address"], "the sidecar must health-check and proxy to where the demo app listens"


def test_service_targets_the_sidecar_not_the_app(base):
    listeners = {port_of(l["listen"]): l for l in base.config["inbound"]}
    sidecar_ports = {p["containerPort"] for p in base.sidecar["ports"]}
    targets = {p["name"]: p["targetPort"] for p in base.service["spec"]["ports"]}
    assert targets["http"] == 15006 == base.container_port("sidecar-http")
    assert listeners[15006]["name"] == "web" and listeners[15006]["listen"].startswith("0.0.0.0:")
    for name, t in targets.items():
        # Numbers: a Service resolves a native sidecar's named ports only from Kubernetes 1.33.
        assert isinstance(t, int), f"Service port {name}: targetPort {t!r} is a name"
        assert t in sidecar_ports and t in listeners, f"Service port {name} targets {t}, not a sidecar listener"
    assert base.service["spec"]["selector"].items() <= base.deployment["spec"]["template"]["metadata"]["labels"].items()


# --------------------------------------------------------------------------------------------
# deploy/webhook
# --------------------------------------------------------------------------------------------
class Webhook:
    def __init__(self, text: str):
        self.docs = documents(text)
        self.mwc = one(self.docs, "MutatingWebhookConfiguration", "sidecar-injector")
        self.deployment = one(self.docs, "Deployment", "sidecar-webhook")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.container = self.pod["containers"][0]
        self.service = one(self.docs, "Service", "sidecar-webhook")
        self.namespace = one(self.docs, "Namespace", "sidecar-system")
        self.config = yaml.safe_load(one(self.docs, "ConfigMap", "sidecar-webhook-config")["data"]["webhook.yaml"])


@pytest.fixture(scope="module")
def webhook(webhook_yaml) -> Webhook:
    return Webhook(webhook_yaml)


def test_webhook_renders_and_every_document_validates_strictly(webhook_yaml, tmp_path):
    assert_every_document_validates(tmp_path, webhook_yaml, "webhook")


def test_webhook_configuration_is_the_specs(webhook):
    hooks = {h["name"]: h for h in webhook.mwc["webhooks"]}
    assert set(hooks) == set(WEBHOOKS)
    for name, path in WEBHOOKS.items():
        h = hooks[name]
        assert h["sideEffects"] == "None"
        assert h["admissionReviewVersions"] == ["v1"]
        assert h["reinvocationPolicy"] == "IfNeeded"
        assert h["timeoutSeconds"] == 5
        assert h["failurePolicy"] == "Ignore"
        assert h["failurePolicy"].lower() == webhook.config["webhook"]["failure_policy"], "the server answers as the API server would"
        assert h["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}]
        svc = h["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"], svc["path"], svc["port"]) == ("sidecar-webhook", "sidecar-system", path, 443)
        assert "caBundle" not in h["clientConfig"], "the caBundle comes from the `sidecar certs webhook` overlay"


def test_namespace_selectors_pick_the_right_namespaces(webhook):
    hooks = {h["name"]: h["namespaceSelector"] for h in webhook.mwc["webhooks"]}

    def called(labels: dict) -> set[str]:
        return {n for n, sel in hooks.items() if selects(sel, labels)}

    def ns(name):
        return {"kubernetes.io/metadata.name": name}   # the API server sets this label on every namespace

    enabled = {"kubernetes.io/metadata.name": "shop", "sidecar.dev/inject": "enabled"}
    disabled = {"kubernetes.io/metadata.name": "shop", "sidecar.dev/inject": "disabled"}
    assert called(enabled) == {"namespace.inject.sidecar.dev"}
    assert called(disabled) == set()
    assert called(ns("default")) == {"annotated.inject.sidecar.dev"}
    for system in ("kube-system", "kube-public", "kube-node-lease", "sidecar-system"):
        assert called(ns(system)) == set(), system
    # The webhook's own namespace as written: never injected, even by the namespace webhook.
    own = {"kubernetes.io/metadata.name": "sidecar-system", **webhook.namespace["metadata"]["labels"]}
    assert called(own) == set()
    assert webhook.namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_webhook_service_reaches_the_listener(webhook):
    (port,) = webhook.service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in webhook.container["ports"]}
    target = port["targetPort"]
    assert port["port"] == 443
    assert (container_ports[target] if isinstance(target, str) else target) == port_of(webhook.config["webhook"]["listen"]) == 8443
    assert webhook.config["webhook"]["listen"].startswith("0.0.0.0:")
    assert webhook.service["spec"]["selector"].items() <= webhook.deployment["spec"]["template"]["metadata"]["labels"].items()


def test_webhook_deployment(webhook):
    d, c, pod = webhook.deployment, webhook.container, webhook.pod
    assert d["spec"]["replicas"] == 2
    assert c["image"] == "sidecar:0.1.0"
    assert c["args"] == ["webhook", "-c", "/etc/sidecar-webhook/webhook.yaml"]
    admin = port_of(webhook.config["admin"]["listen"])
    assert admin == ADMIN_PORT and webhook.config["admin"]["listen"].startswith("0.0.0.0:")
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": admin}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": admin}
    assert restricted_violations(pod) == []
    # webhook.yaml and the serving cert where the config and the args say.
    m, v = mounted_volume(pod, c, "/etc/sidecar-webhook/webhook.yaml")
    cm = [s["configMap"] for s in v["projected"]["sources"] if "configMap" in s]
    assert cm and cm[0]["name"] == "sidecar-webhook-config"
    for key in ("cert", "key"):
        f = webhook.config["webhook"]["tls"][key]
        m, v = mounted_volume(pod, c, f)
        rel = f[len(m["mountPath"]):].lstrip("/")
        secrets = [s["secret"] for s in v["projected"]["sources"] if "secret" in s]
        assert any(s["name"] == "sidecar-webhook-tls" and {"key": Path(f).name, "path": rel} in s["items"] for s in secrets), (f, v)
    assert not [d for d in webhook.docs if d["kind"] == "Secret"], "the serving key is made by `sidecar certs webhook`, not kept in git"


def test_webhook_needs_no_api_access(webhook):
    sa = one(webhook.docs, "ServiceAccount", "sidecar-webhook")
    assert sa["automountServiceAccountToken"] is False
    assert webhook.pod["serviceAccountName"] == "sidecar-webhook" and webhook.pod["automountServiceAccountToken"] is False
    assert not [d for d in webhook.docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


def test_webhook_pdb_and_namespace(webhook):
    pdb = one(webhook.docs, "PodDisruptionBudget", "sidecar-webhook")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"], webhook.deployment["spec"]["template"]["metadata"]["labels"])
    for d in webhook.docs:
        if d["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert d["metadata"].get("namespace") == "sidecar-system", (d["kind"], d["metadata"])


def test_certs_webhook_overlay_installs_in_one_step(tmp_path):
    # `sidecar certs webhook ... OUT && kubectl apply -k OUT` (deploy/README.md): OUT renders,
    # validates, carries the Secret and both caBundles, and the cert is for the Service.
    from cryptography import x509

    out = tmp_path / "webhook-install"
    p = run_sidecar_cmd("certs", "webhook", "--namespace", "sidecar-system", "--service", "sidecar-webhook", out)
    assert p.returncode == 0, f"sidecar certs webhook: status {p.returncode}\n{p.stdout}{p.stderr}"
    for f in ("ca.crt", "tls.crt", "tls.key", "kustomization.yaml"):
        assert (out / f).is_file(), f"{f} not written in {out}: {sorted(x.name for x in out.iterdir())}"
    text = kustomize(out)
    assert_every_document_validates(tmp_path, text, "webhook-overlay")
    docs = documents(text)
    ca_pem = (out / "ca.crt").read_bytes()
    hooks = one(docs, "MutatingWebhookConfiguration", "sidecar-injector")["webhooks"]
    assert {h["name"] for h in hooks} == set(WEBHOOKS)
    for h in hooks:
        assert base64.b64decode(h["clientConfig"]["caBundle"]) == ca_pem, h["name"]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert len(secrets) == 1 and secrets[0]["metadata"]["namespace"] == "sidecar-system"
    secret = secrets[0]
    assert secret["metadata"]["name"].startswith("sidecar-webhook-tls")
    assert base64.b64decode(secret["data"]["tls.crt"]) == (out / "tls.crt").read_bytes()
    assert base64.b64decode(secret["data"]["tls.key"]) == (out / "tls.key").read_bytes()
    pod = one(docs, "Deployment", "sidecar-webhook")["spec"]["template"]["spec"]
    mounted = [s["secret"]["name"] for v in pod["volumes"] for s in (v.get("projected") or {}).get("sources", []) if "secret" in s]
    assert mounted == [secret["metadata"]["name"]], "the Deployment mounts the Secret the overlay made"
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "sidecar-webhook.sidecar-system.svc" in names, names
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert.verify_directly_issued_by(ca)


# --------------------------------------------------------------------------------------------
# every sidecar.yaml under deploy/ passes the real `sidecar check`
# --------------------------------------------------------------------------------------------
SIDECAR_CONFIGS = sorted(DEPLOY.rglob("sidecar.yaml"))


def test_there_are_sidecar_configs_to_check():
    assert DEPLOY / "base" / "sidecar.yaml" in SIDECAR_CONFIGS


@pytest.mark.parametrize("path", SIDECAR_CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_sidecar_check_accepts(path, tmp_path):
    # `check` loads the TLS files too; in the pod they come from the Secret at /etc/sidecar/tls.
    # Here the same files, made by `sidecar certs`, sit in a temporary directory instead.
    text = path.read_text()
    if "/etc/sidecar/tls/" in text:
        ca, tls = tmp_path / "ca", tmp_path / "tls"
        for args in (("certs", "init", ca), ("certs", "issue", "--ca", ca, "--spiffe", "spiffe://cluster.local/ns/default/sa/web", "--dns", "web", tls)):
            p = run_sidecar_cmd(*args)
            assert p.returncode == 0, f"sidecar {' '.join(map(str, args))}: {p.stderr}"
        text = text.replace("/etc/sidecar/tls/", f"{tls}/")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(text)
    p = run_sidecar_cmd("check", "-c", cfg)
    assert p.returncode == 0, f"sidecar check {path.relative_to(REPO_ROOT)}: status {p.returncode}\n{p.stderr}"
    assert p.stdout.strip().endswith(": ok"), p.stdout
