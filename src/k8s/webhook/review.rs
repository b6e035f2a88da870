//! One AdmissionReview: decide, with the same code as `sidecar inject`, and answer with its
//! JSON Patch; count the outcome.
//!
//! Not the transport (TLS, HTTP, limits): `webhook.rs` does that and hands over the body.

use std::sync::Arc;

use base64::Engine as _;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::config::webhook::FailurePolicy;
use crate::k8s::inject::manifest::{self, ObjectError};
use crate::k8s::inject::{ANNOTATION_INJECT, Outcome, Settings};

/// Which pods a path injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/inject`, for namespaces labelled `sidecar.dev/inject=enabled`: every pod, unless it
    /// says `disabled`.
    Namespace,
    /// `/inject-annotated`, for other namespaces: only pods annotated `enabled`. The API
    /// server can select namespaces by label but pods only by label, not annotation, so this
    /// check is ours.
    Annotated,
}

/// What became of a review, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    requests: Family<ResultLabel, Counter>,
    duration: Histogram,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            // 0.1 ms to ~1.6 s: a review takes well under a millisecond; the API server
            // gives up at the webhook's timeoutSeconds (5 s in deploy/).
            duration: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        };
        registry.register(
            "webhook_requests",
            "Admission reviews answered, by result: injected, unchanged (already injected), \
             skipped (not wanted, not a workload), error (answered by the failure policy), \
             invalid (not a review: 400)",
            m.requests.clone(),
        );
        registry.register(
            "webhook_request_duration_seconds",
            "Time to answer an admission review, from its body read to its answer",
            m.duration.clone(),
        );
        for result in ["injected", "unchanged", "skipped", "error", "invalid"] {
            let _ = m.requests.get_or_create(&ResultLabel { result });
        }
        m
    }

    pub fn count(&self, result: &'static str) {
        self.requests.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn observe(&self, seconds: f64) {
        self.duration.observe(seconds);
    }
}

/// What the webhook decides with.
pub struct Reviewer {
    pub defaults: Settings,
    pub policy: FailurePolicy,
    pub metrics: Metrics,
}

/// A body that is not an AdmissionReview with a request: answered 400 with this reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

impl Reviewer {
    /// The AdmissionReview to send back for `body`.
    pub fn review(self: &Arc<Self>, mode: Mode, body: &[u8]) -> Result<Vec<u8>, Invalid> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(|e| {
            self.metrics.count("invalid");
            Invalid(format!("not an admission.k8s.io/v1 AdmissionReview: {e}"))
        })?;
        let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| {
            self.metrics.count("invalid");
            Invalid("the AdmissionReview has no request".to_owned())
        })?;
        let (response, result) = self.decide(mode, &request);
        self.metrics.count(result);
        encode(response).map_err(|e| Invalid(format!("encoding the answer: {e}")))
    }

    fn decide(
        &self,
        mode: Mode,
        request: &AdmissionRequest<DynamicObject>,
    ) -> (AdmissionResponse, &'static str) {
        let allowed = AdmissionResponse::from(request);
        let Some(object) = &request.object else { return (allowed, "skipped") };
        if !matches!(request.operation, Operation::Create | Operation::Update) {
            return (allowed, "skipped");
        }
        let value = match object_json(request, object) {
            Ok(v) => v,
            Err(e) => return self.failed(allowed, request, &e),
        };
        if mode == Mode::Annotated && !manifest::annotated(&value, ANNOTATION_INJECT, "enabled") {
            return (allowed, "skipped");
        }
        match manifest::patch(&self.defaults, &value) {
            Ok((patch, Some(Outcome::Injected))) if !patch.0.is_empty() => {
                tracing::info!(
                    object = %manifest::describe(&value),
                    namespace = request.namespace.as_deref().unwrap_or(""),
                    dry_run = request.dry_run,
                    "sidecar injected"
                );
                match allowed.clone().with_patch(patch) {
                    Ok(r) => (r, "injected"),
                    Err(e) => {
                        let e = ObjectError { path: String::new(), message: e.to_string() };
                        self.failed(allowed, request, &e)
                    }
                }
            }
            Ok((_, Some(Outcome::Injected))) => (allowed, "unchanged"),
            Ok(_) => (allowed, "skipped"),
            Err(e) => self.failed(allowed, request, &e),
        }
    }

    /// A request this webhook cannot handle, answered by the failure policy, never by
    /// leaving the API server waiting.
    fn failed(
        &self,
        allowed: AdmissionResponse,
        request: &AdmissionRequest<DynamicObject>,
        e: &ObjectError,
    ) -> (AdmissionResponse, &'static str) {
        let name = if request.name.is_empty() { "(generated name)" } else { &request.name };
        let why = format!("sidecar injection into {} {name}: {e}", request.kind.kind);
        tracing::warn!(error = %why, policy = ?self.policy, "cannot inject");
        let response = match self.policy {
            FailurePolicy::Ignore => {
                let mut r = allowed;
                r.warnings =
                    Some(vec![format!("{why}; admitted without the sidecar (failure_policy: ignore)")]);
                r
            }
            FailurePolicy::Fail => allowed.deny(why),
        };
        (response, "error")
    }
}

/// The review to send back. kube-core serialises the patch (`Vec<u8>`) as an array of
/// numbers; Go's `[]byte`, which the API server decodes it into, is written as base64, as
/// every other webhook sends it, so it is sent that way here.
fn encode(response: AdmissionResponse) -> Result<Vec<u8>, serde_json::Error> {
    let patch = response.patch.clone();
    let mut review = serde_json::to_value(response.into_review())?;
    if let (Some(patch), Some(slot)) = (patch, review.pointer_mut("/response/patch")) {
        *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    serde_json::to_vec(&review)
}

/// The object as JSON, with its `apiVersion` and `kind` taken from the request when the
/// object itself leaves them out.
fn object_json(
    request: &AdmissionRequest<DynamicObject>,
    object: &DynamicObject,
) -> Result<Value, ObjectError> {
    let mut value = serde_json::to_value(object)
        .map_err(|e| ObjectError { path: String::new(), message: e.to_string() })?;
    if let Value::Object(map) = &mut value {
        let gvk = &request.kind;
        let api_version =
            if gvk.group.is_empty() { gvk.version.clone() } else { format!("{}/{}", gvk.group, gvk.version) };
        map.entry("apiVersion").or_insert(Value::String(api_version));
        map.entry("kind").or_insert(Value::String(gvk.kind.clone()));
    }
    Ok(value)
}
