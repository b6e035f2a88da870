//! Documents in, documents out: which kinds carry a pod spec, how each is typed
//! (`k8s-openapi`), and the patch that injection makes to one object.
//!
//! The change is computed on the typed object and then applied, as a JSON Patch, to the object
//! as it was read: fields this build's schema does not know (a newer cluster's) survive, and
//! the webhook answers with exactly the patch that `sidecar inject` applies.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use serde::Serialize;
use serde::de::{Deserialize, DeserializeOwned};
use serde_json::Value;

use super::{BadAnnotation, Outcome, Settings, inject_pod};

/// One object that could not be injected, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ObjectError {
    /// A field path like `spec.template.spec.containers[0].ports[0].containerPort`.
    pub path: String,
    pub message: String,
}

/// Bad input to `sidecar inject`: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{file}: cannot read: {error}")]
    Read { file: String, error: std::io::Error },
    #[error("{file}: document {index}: not valid YAML: {error}")]
    Yaml { file: String, index: usize, error: serde_yaml_ng::Error },
    #[error("{file}: document {index} ({what}): {error}")]
    Object { file: String, index: usize, what: String, error: ObjectError },
}

/// What injection did to one object, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// `deployment/web`, `pod/<generateName>…`, `service/web`.
    pub what: String,
    /// `None`: not a workload, passed through.
    pub outcome: Option<Outcome>,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Some(Outcome::Injected) => write!(f, "{} injected", self.what),
            Some(Outcome::Skipped(why)) => write!(f, "{} skipped: {why}", self.what),
            None => write!(f, "{} passed through (no pod spec)", self.what),
        }
    }
}

/// The files `-f` names: a file, `-` (standard input), or a directory's `.yaml`, `.yml` and
/// `.json` files, recursively, in name order.
pub fn sources(arg: &Path) -> Result<Vec<PathBuf>, InjectError> {
    if arg == Path::new("-") || !arg.is_dir() {
        return Ok(vec![arg.to_owned()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![arg.to_owned()];
    while let Some(dir) = dirs.pop() {
        let read = |error| InjectError::Read { file: dir.display().to_string(), error };
        for entry in std::fs::read_dir(&dir).map_err(read)? {
            let path = entry.map_err(read)?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `sidecar inject -f …`: every file's documents injected, as one multi-document YAML.
pub fn inject_files(defaults: &Settings, args: &[PathBuf]) -> Result<(String, Vec<Line>), InjectError> {
    let mut docs = Vec::new();
    let mut lines = Vec::new();
    for arg in args {
        for path in sources(arg)? {
            let (name, text) = if path == Path::new("-") {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .map_err(|error| InjectError::Read { file: "-".to_owned(), error })?;
                ("<stdin>".to_owned(), text)
            } else {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(&path)
                    .map_err(|error| InjectError::Read { file: name.clone(), error })?;
                (name, text)
            };
            let (d, l) = inject_text(defaults, &name, &text)?;
            docs.extend(d);
            lines.extend(l);
        }
    }
    let yaml =
        to_yaml(&docs).map_err(|error| InjectError::Yaml { file: "<output>".to_owned(), index: 0, error })?;
    Ok((yaml, lines))
}

/// Every document of `text` with Sidecar added where it belongs; `source` names the text in
/// errors. Empty documents are dropped. All or nothing: the first bad document is an error.
pub fn inject_text(
    defaults: &Settings,
    source: &str,
    text: &str,
) -> Result<(Vec<Value>, Vec<Line>), InjectError> {
    let mut out = Vec::new();
    let mut lines = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(doc).map_err(|error| InjectError::Yaml {
            file: source.to_owned(),
            index,
            error,
        })?;
        if value.is_null() {
            continue;
        }
        let what = describe(&value);
        let injected = inject_value(defaults, &value, &mut lines).map_err(|error| InjectError::Object {
            file: source.to_owned(),
            index,
            what,
            error,
        })?;
        out.push(injected);
    }
    Ok((out, lines))
}

/// Documents as multi-document YAML.
pub fn to_yaml(docs: &[Value]) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(d)?);
    }
    Ok(out)
}

/// One object, or a `List` of them, injected.
fn inject_value(defaults: &Settings, value: &Value, lines: &mut Vec<Line>) -> Result<Value, ObjectError> {
    if value.get("kind").and_then(Value::as_str) == Some("List") {
        let mut list = value.clone();
        if let Some(items) = list.get_mut("items").and_then(Value::as_array_mut) {
            for (i, item) in items.iter_mut().enumerate() {
                *item = inject_value(defaults, item, lines).map_err(|e| ObjectError {
                    path: format!("items[{i}].{}", e.path),
                    message: e.message,
                })?;
            }
        }
        return Ok(list);
    }
    let (patch, outcome) = patch(defaults, value)?;
    lines.push(Line { what: describe(value), outcome: outcome.clone() });
    let mut out = value.clone();
    json_patch::patch(&mut out, &patch)
        .map_err(|e| ObjectError { path: String::new(), message: format!("applying the injection: {e}") })?;
    Ok(out)
}

/// The JSON Patch that injects into `object`, and what it does. An empty patch for kinds
/// without a pod spec (`None`) and for skipped pods.
pub fn patch(
    defaults: &Settings,
    object: &Value,
) -> Result<(json_patch::Patch, Option<Outcome>), ObjectError> {
    let text = |field: &str| object.get(field).and_then(Value::as_str);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        let field = if text("apiVersion").is_none() { "apiVersion" } else { "kind" };
        return Err(ObjectError { path: field.to_owned(), message: "missing, or not a string".to_owned() });
    };
    let typed = match (api_version, kind) {
        ("v1", "Pod") => typed::<Pod>(object, |p: &mut Pod| {
            let spec = p.spec.as_mut().ok_or_else(|| missing("spec"))?;
            inject_pod(defaults, None, &mut p.metadata, spec).map_err(annotation("metadata"))
        }),
        ("apps/v1", "Deployment") => typed::<Deployment>(object, |d: &mut Deployment| {
            let spec = &mut d.spec;
            template(defaults, &d.metadata, &mut spec.template, "spec.template")
        }),
        ("apps/v1", "StatefulSet") => typed::<StatefulSet>(object, |d: &mut StatefulSet| {
            let spec = &mut d.spec;
            template(defaults, &d.metadata, &mut spec.template, "spec.template")
        }),
        ("apps/v1", "DaemonSet") => typed::<DaemonSet>(object, |d: &mut DaemonSet| {
            let spec = &mut d.spec;
            template(defaults, &d.metadata, &mut spec.template, "spec.template")
        }),
        ("apps/v1", "ReplicaSet") => typed::<ReplicaSet>(object, |d: &mut ReplicaSet| {
            let spec = &mut d.spec;
            let t = spec.template.as_mut().ok_or_else(|| missing("spec.template"))?;
            template(defaults, &d.metadata, t, "spec.template")
        }),
        ("batch/v1", "Job") => typed::<Job>(object, |j: &mut Job| {
            let spec = j.spec.as_mut().ok_or_else(|| missing("spec"))?;
            template(defaults, &j.metadata, &mut spec.template, "spec.template")
        }),
        ("batch/v1", "CronJob") => typed::<CronJob>(object, |c: &mut CronJob| {
            let spec = &mut c.spec;
            let job = spec.job_template.spec.as_mut().ok_or_else(|| missing("spec.jobTemplate.spec"))?;
            template(defaults, &c.metadata, &mut job.template, "spec.jobTemplate.spec.template")
        }),
        (_, "Pod" | "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "CronJob") => {
            let want = if matches!(kind, "Pod") {
                "v1"
            } else if matches!(kind, "Job" | "CronJob") {
                "batch/v1"
            } else {
                "apps/v1"
            };
            return Err(ObjectError {
                path: "apiVersion".to_owned(),
                message: format!("`{api_version}` {kind} is not supported: use {want}"),
            });
        }
        _ => return Ok((json_patch::Patch(Vec::new()), None)),
    };
    let (before, after, outcome) = typed?;
    Ok((json_patch::diff(&before, &after), Some(outcome)))
}

/// `object` as the typed `K`, changed by `change`: its JSON before and after.
fn typed<K: DeserializeOwned + Serialize>(
    object: &Value,
    change: impl FnOnce(&mut K) -> Result<Outcome, ObjectError>,
) -> Result<(Value, Value, Outcome), ObjectError> {
    let mut k: K = serde_path_to_error::deserialize(object)
        .map_err(|e| ObjectError { path: e.path().to_string(), message: e.inner().to_string() })?;
    let json = |k: &K| {
        serde_json::to_value(k).map_err(|e| ObjectError { path: String::new(), message: e.to_string() })
    };
    let before = json(&k)?;
    let outcome = change(&mut k)?;
    Ok((before, json(&k)?, outcome))
}

fn template(
    defaults: &Settings,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    template: &mut PodTemplateSpec,
    at: &str,
) -> Result<Outcome, ObjectError> {
    let spec = template.spec.as_mut().ok_or_else(|| missing(&format!("{at}.spec")))?;
    let meta = template.metadata.get_or_insert_with(Default::default);
    inject_pod(defaults, Some(owner), meta, spec).map_err(annotation(&format!("{at}.metadata")))
}

fn missing(path: &str) -> ObjectError {
    ObjectError { path: path.to_owned(), message: "missing: a workload needs a pod spec".to_owned() }
}

fn annotation(meta_path: &str) -> impl Fn(BadAnnotation) -> ObjectError + '_ {
    move |e| ObjectError { path: format!("{meta_path}.annotations.{}", e.key), message: e.message }
}

/// `deployment/web` (or `pod/web-…` for a generated name).
pub fn describe(object: &Value) -> String {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("object").to_ascii_lowercase();
    let meta = object.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    match (field("name"), field("generateName")) {
        (Some(name), _) if !name.is_empty() => format!("{kind}/{name}"),
        (_, Some(prefix)) => format!("{kind}/{prefix}…"),
        _ => format!("{kind}/(unnamed)"),
    }
}

/// True when the object, or the pod template it carries, has annotation `key` set to `value`.
pub fn annotated(object: &Value, key: &str, value: &str) -> bool {
    let templates = [
        &object["metadata"],
        &object["spec"]["template"]["metadata"],
        &object["spec"]["jobTemplate"]["spec"]["template"]["metadata"],
    ];
    templates.iter().any(|meta| meta["annotations"][key].as_str() == Some(value))
}
