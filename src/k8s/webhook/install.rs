//! `sidecar certs webhook`: the webhook's serving certificate, its CA, and a kustomize overlay
//! of `deploy/webhook` that makes the Secret and fills both webhooks' `caBundle`, so that
//! `kubectl apply -k OUT` installs the webhook in one step.
//!
//! The base is copied out of the binary (`OUT/base/`), so the overlay works wherever the
//! binary is, without a checkout of this repository.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use base64::Engine as _;

use crate::tls::certs::{self, CertsError};

/// `deploy/webhook`, as built into this binary.
const BASE: &[(&str, &str)] = &[
    ("kustomization.yaml", include_str!("../../../deploy/webhook/kustomization.yaml")),
    ("namespace.yaml", include_str!("../../../deploy/webhook/namespace.yaml")),
    ("serviceaccount.yaml", include_str!("../../../deploy/webhook/serviceaccount.yaml")),
    ("deployment.yaml", include_str!("../../../deploy/webhook/deployment.yaml")),
    ("poddisruptionbudget.yaml", include_str!("../../../deploy/webhook/poddisruptionbudget.yaml")),
    ("service.yaml", include_str!("../../../deploy/webhook/service.yaml")),
    (
        "mutatingwebhookconfiguration.yaml",
        include_str!("../../../deploy/webhook/mutatingwebhookconfiguration.yaml"),
    ),
    ("webhook.yaml", include_str!("../../../deploy/webhook/webhook.yaml")),
];

/// The names the base uses; the certificate is for this Service in this namespace.
pub const DEFAULT_NAMESPACE: &str = "sidecar-system";
pub const DEFAULT_SERVICE: &str = "sidecar-webhook";

/// Writes `OUT/ca/{ca.crt,ca.key}`, `OUT/{tls.crt,tls.key,ca.crt}`, `OUT/base/` and
/// `OUT/kustomization.yaml`. Refuses to overwrite anything.
pub fn write(namespace: &str, service: &str, out: &Path) -> Result<(), CertsError> {
    let ca_dir = out.join("ca");
    certs::init(&ca_dir)?;
    // The names the API server may call the Service by (it uses `SERVICE.NAMESPACE.svc`).
    let dns: Vec<String> = [
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
    .into();
    certs::issue(&ca_dir, &format!("spiffe://cluster.local/ns/{namespace}/sa/{service}"), &dns, out)?;
    let base = out.join("base");
    std::fs::create_dir_all(&base).map_err(|error| CertsError::Io { path: base.clone(), error })?;
    for (name, text) in BASE {
        create(&base.join(name), text)?;
    }
    let ca_path = out.join(certs::CA_CERT);
    let ca = std::fs::read(&ca_path).map_err(|error| CertsError::Io { path: ca_path, error })?;
    create(&out.join("kustomization.yaml"), &overlay(namespace, service, &ca))
}

fn overlay(namespace: &str, service: &str, ca_pem: &[u8]) -> String {
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    // kustomize's `namespace:` moves the objects but not the webhooks' Service reference, nor
    // the namespace the annotated webhook leaves out: those are patched here.
    let mut ops = String::new();
    for i in 0..2 {
        ops.push_str(&format!(
            "      - {{ op: add, path: /webhooks/{i}/clientConfig/caBundle, value: {bundle} }}\n"
        ));
        if service != DEFAULT_SERVICE {
            ops.push_str(&format!(
                "      - {{ op: replace, path: /webhooks/{i}/clientConfig/service/name, value: {service} }}\n"
            ));
        }
        if namespace != DEFAULT_NAMESPACE {
            ops.push_str(&format!(
                "      - {{ op: replace, path: /webhooks/{i}/clientConfig/service/namespace, value: {namespace} }}\n"
            ));
        }
    }
    if namespace != DEFAULT_NAMESPACE {
        ops.push_str(&format!(
            "      - {{ op: replace, path: /webhooks/1/namespaceSelector/matchExpressions/1/values/3, value: {namespace} }}\n"
        ));
    }
    let mut rename = String::new();
    if service != DEFAULT_SERVICE {
        rename = format!(
            "  - target: {{ kind: Service, name: {DEFAULT_SERVICE} }}\n    patch: |-\n      - {{ op: replace, path: /metadata/name, value: {service} }}\n"
        );
    }
    format!(
        "# Written by `sidecar certs webhook`: the webhook of deploy/webhook (copied to base/), its
# serving certificate as the Secret sidecar-webhook-tls, and the CA that signed it as both
# webhooks' caBundle. Install with `kubectl apply -k` on this directory. Keep ca/ca.key private (or
# delete it: re-running the command makes a new CA and certificate).
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: {namespace}
resources:
  - base
secretGenerator:
  - name: sidecar-webhook-tls
    type: kubernetes.io/tls
    files:
      - tls.crt
      - tls.key
patches:
  - target: {{ kind: MutatingWebhookConfiguration, name: sidecar-injector }}
    patch: |-
{ops}{rename}"
    )
}

fn create(path: &Path, text: &str) -> Result<(), CertsError> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CertsError::Exists { path: path.to_owned() },
        _ => CertsError::Io { path: path.to_owned(), error: e },
    })?;
    f.write_all(text.as_bytes()).map_err(|error| CertsError::Io { path: path.to_owned(), error })
}
