//! Adding Sidecar to a pod spec: what the container looks like, which annotations change it,
//! and taking a previous injection out first so that injecting twice equals injecting once.
//!
//! Shared by `sidecar inject` (`inject/manifest.rs`, files of many documents) and the
//! admission webhook (`k8s::webhook`, one object at a time). It does not read files or talk
//! to a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSpec, Probe, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub mod manifest;

/// The project's annotation (and namespace label) prefix: a DNS subdomain, as Kubernetes
/// requires of prefixed keys, that names the project.
pub const PREFIX: &str = "sidecar.dev/";
/// `enabled` / `disabled` on a pod or pod template; the namespace label of the same name
/// turns the webhook on for a namespace.
pub const ANNOTATION_INJECT: &str = "sidecar.dev/inject";
/// Written by the injection: the version that injected. Its presence is what tells a strip
/// that the `sidecar` container is ours.
pub const ANNOTATION_INJECTED: &str = "sidecar.dev/injected";
const ANNOTATION_CONFIG: &str = "sidecar.dev/config";
const ANNOTATION_TLS_SECRET: &str = "sidecar.dev/tls-secret";
const ANNOTATION_IMAGE: &str = "sidecar.dev/image";
const ANNOTATION_ADMIN_PORT: &str = "sidecar.dev/admin-port";
const ANNOTATION_PORTS: &str = "sidecar.dev/ports";
const ANNOTATION_CPU_REQUEST: &str = "sidecar.dev/cpu-request";
const ANNOTATION_MEMORY_REQUEST: &str = "sidecar.dev/memory-request";
const ANNOTATION_CPU_LIMIT: &str = "sidecar.dev/cpu-limit";
const ANNOTATION_MEMORY_LIMIT: &str = "sidecar.dev/memory-limit";

/// The injected container's name, and the names of the volumes it brings.
pub const CONTAINER: &str = "sidecar";
const VOLUME_CONFIG: &str = "sidecar-config";
const VOLUME_TLS: &str = "sidecar-tls";
const CONFIG_DIR: &str = "/etc/sidecar/config";
const TLS_DIR: &str = "/etc/sidecar/tls";

/// The image's user (distroless's `nonroot`): any non-zero UID meets the restricted Pod
/// Security profile; a fixed one makes file ownership on shared volumes predictable.
const RUN_AS: i64 = 65532;

/// Resource defaults from `bench/run`: idle RSS 7.6 MiB, 18.9 MiB peak at 64 connections,
/// 20–25 MiB while shipping logs, so 32Mi requested and 128Mi as the ceiling (500 slow
/// readers stay under 64 MiB). About 1.2 CPU-seconds per 100k requests: 50m carries some
/// 4k req/s; no CPU limit, so bursts are not throttled.
const DEFAULT_CPU_REQUEST: &str = "50m";
const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
const DEFAULT_MEMORY_LIMIT: &str = "128Mi";

/// What an injection adds, before a pod's annotations have their say.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub image: String,
    /// ConfigMap with `sidecar.yaml`, mounted as a directory so the kubelet's updates reach
    /// the running sidecar (a `subPath` mount would freeze it).
    pub config_map: String,
    pub tls_secret: Option<String>,
    pub admin_port: u16,
    pub ports: Vec<(String, u16)>,
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
    /// An init container with `restartPolicy: Always` (Kubernetes ≥ 1.29): started before
    /// the app and stopped after it. False: a plain container, for older clusters.
    pub native: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            image: format!("sidecar:{}", env!("CARGO_PKG_VERSION")),
            config_map: "sidecar-config".to_owned(),
            tls_secret: None,
            admin_port: 15000,
            ports: vec![("sidecar-http".to_owned(), 15006)],
            cpu_request: Some(DEFAULT_CPU_REQUEST.to_owned()),
            memory_request: Some(DEFAULT_MEMORY_REQUEST.to_owned()),
            cpu_limit: None,
            memory_limit: Some(DEFAULT_MEMORY_LIMIT.to_owned()),
            native: true,
        }
    }
}

/// An annotation whose value cannot be used; `key` is the annotation's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {message}")]
pub struct BadAnnotation {
    pub key: &'static str,
    pub message: String,
}

/// What happened to one pod spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Left as it was, and why.
    Skipped(&'static str),
}

impl Settings {
    /// These settings with the pod's annotations applied: `workload` (a Deployment's own
    /// metadata, say) first, then the pod template's, which win.
    pub fn with_annotations(
        &self,
        layers: &[Option<&BTreeMap<String, String>>],
    ) -> Result<Settings, BadAnnotation> {
        let mut s = self.clone();
        for annotations in layers.iter().flatten() {
            for (key, value) in annotations.iter().filter(|(k, _)| k.starts_with(PREFIX)) {
                s.apply(key, value.trim())?;
            }
        }
        Ok(s)
    }

    fn apply(&mut self, key: &str, value: &str) -> Result<(), BadAnnotation> {
        let bad = |key: &'static str, message: String| BadAnnotation { key, message };
        match key {
            ANNOTATION_CONFIG => self.config_map = dns_name(ANNOTATION_CONFIG, value)?,
            ANNOTATION_TLS_SECRET => self.tls_secret = Some(dns_name(ANNOTATION_TLS_SECRET, value)?),
            ANNOTATION_IMAGE if !value.is_empty() && !value.contains(char::is_whitespace) => {
                self.image = value.to_owned()
            }
            ANNOTATION_IMAGE => return Err(bad(ANNOTATION_IMAGE, format!("`{value}` is not an image"))),
            ANNOTATION_ADMIN_PORT => self.admin_port = port(ANNOTATION_ADMIN_PORT, value)?,
            ANNOTATION_PORTS => self.ports = ports(value)?,
            ANNOTATION_CPU_REQUEST => self.cpu_request = quantity(ANNOTATION_CPU_REQUEST, value)?,
            ANNOTATION_MEMORY_REQUEST => self.memory_request = quantity(ANNOTATION_MEMORY_REQUEST, value)?,
            ANNOTATION_CPU_LIMIT => self.cpu_limit = quantity(ANNOTATION_CPU_LIMIT, value)?,
            ANNOTATION_MEMORY_LIMIT => self.memory_limit = quantity(ANNOTATION_MEMORY_LIMIT, value)?,
            // `inject` and `injected` are read by `inject_pod`; unknown keys under the prefix
            // are left alone so that a newer injector's annotations do not break an older one.
            _ => {}
        }
        Ok(())
    }
}

fn port(key: &'static str, value: &str) -> Result<u16, BadAnnotation> {
    match value.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(BadAnnotation { key, message: format!("`{value}` is not a port (1-65535)") }),
    }
}

/// `sidecar-http:15006,sidecar-tls:15443` (a bare port gets the name `sidecar-PORT`).
fn ports(value: &str) -> Result<Vec<(String, u16)>, BadAnnotation> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, p) = match item.split_once(':') {
            Some((name, p)) => (name.trim().to_owned(), port(ANNOTATION_PORTS, p.trim())?),
            None => {
                let p = port(ANNOTATION_PORTS, item)?;
                (format!("sidecar-{p}"), p)
            }
        };
        // IANA_SVC_NAME, as a container port's name must be: ≤ 15 lowercase letters, digits
        // and dashes, with a letter, not starting or ending with a dash.
        let ok = (1..=15).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && name.bytes().any(|b| b.is_ascii_lowercase())
            && !name.starts_with('-')
            && !name.ends_with('-')
            && !name.contains("--");
        if !ok {
            return Err(BadAnnotation {
                key: ANNOTATION_PORTS,
                message: format!("`{name}` is not a port name (1-15 lowercase letters, digits, dashes)"),
            });
        }
        out.push((name, p));
    }
    Ok(out)
}

/// A resource quantity (`50m`, `128Mi`, `1.5`), or `none` to leave it unset.
fn quantity(key: &'static str, value: &str) -> Result<Option<String>, BadAnnotation> {
    if value == "none" {
        return Ok(None);
    }
    let digits = value.trim_start_matches(['+', '-']);
    let number_end = digits.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(digits.len());
    let (number, suffix) = digits.split_at(number_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || (suffix.len() > 1
        && suffix.starts_with(['e', 'E'])
        && suffix[1..].trim_start_matches(['+', '-']).bytes().all(|b| b.is_ascii_digit()));
    if number_ok && suffix_ok {
        Ok(Some(value.to_owned()))
    } else {
        Err(BadAnnotation { key, message: format!("`{value}` is not a quantity like `50m` or `128Mi`") })
    }
}

/// A ConfigMap or Secret name: an RFC 1123 subdomain.
fn dns_name(key: &'static str, value: &str) -> Result<String, BadAnnotation> {
    let ok = (1..=253).contains(&value.len())
        && value.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(value.to_owned())
    } else {
        Err(BadAnnotation { key, message: format!("`{value}` is not a valid object name") })
    }
}

/// Injects into one pod spec, whose metadata is `meta` (a pod's, or a template's) and whose
/// owner's metadata, if any, is `owner`. A previous injection is taken out first, so the
/// result does not depend on whether the spec was injected before.
pub fn inject_pod(
    defaults: &Settings,
    owner: Option<&ObjectMeta>,
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
) -> Result<Outcome, BadAnnotation> {
    if wanted(Some(meta)).or(wanted(owner)) == Some("disabled") {
        return Ok(Outcome::Skipped("annotated sidecar.dev/inject: disabled"));
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped("hostNetwork: the sidecar's ports would be the node's"));
    }
    let settings = defaults
        .with_annotations(&[owner.and_then(|o| o.annotations.as_ref()), meta.annotations.as_ref()])?;
    strip(meta, spec);
    if let Some(taken) =
        spec.containers.iter().chain(spec.init_containers.iter().flatten()).find(|c| c.name == CONTAINER)
    {
        return Err(BadAnnotation {
            key: ANNOTATION_INJECTED,
            message: format!(
                "the pod already has a container named `{}` that this injector did not add",
                taken.name
            ),
        });
    }
    let app_container = spec.containers.first().map(|c| c.name.clone()).unwrap_or_default();
    let mut sidecar = container(&settings, &app_container);
    if settings.native {
        sidecar.restart_policy = Some("Always".to_owned());
        spec.init_containers.get_or_insert_with(Vec::new).insert(0, sidecar);
    } else {
        spec.containers.insert(0, sidecar);
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: VOLUME_CONFIG.to_owned(),
        config_map: Some(ConfigMapVolumeSource { name: settings.config_map.clone(), ..Default::default() }),
        ..Default::default()
    });
    if let Some(secret) = &settings.tls_secret {
        volumes.push(Volume {
            name: VOLUME_TLS.to_owned(),
            secret: Some(SecretVolumeSource { secret_name: Some(secret.clone()), ..Default::default() }),
            ..Default::default()
        });
    }
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_INJECTED.to_owned(), env!("CARGO_PKG_VERSION").to_owned());
    Ok(Outcome::Injected)
}

/// The `sidecar.dev/inject` annotation's value.
fn wanted(meta: Option<&ObjectMeta>) -> Option<&str> {
    meta.and_then(|m| m.annotations.as_ref()).and_then(|a| a.get(ANNOTATION_INJECT)).map(String::as_str)
}

/// Takes out what an earlier injection added, when the `injected` annotation says there was
/// one; a spec this injector never touched is left as it is.
fn strip(meta: &mut ObjectMeta, spec: &mut PodSpec) {
    let Some(annotations) = meta.annotations.as_mut() else { return };
    if annotations.remove(ANNOTATION_INJECTED).is_none() {
        return;
    }
    if annotations.is_empty() {
        meta.annotations = None;
    }
    spec.containers.retain(|c| c.name != CONTAINER);
    if let Some(init) = spec.init_containers.as_mut() {
        init.retain(|c| c.name != CONTAINER);
        if init.is_empty() {
            spec.init_containers = None;
        }
    }
    if let Some(volumes) = spec.volumes.as_mut() {
        volumes.retain(|v| v.name != VOLUME_CONFIG && v.name != VOLUME_TLS);
        if volumes.is_empty() {
            spec.volumes = None;
        }
    }
}

/// The container itself: probes on the admin port, a preStop that drains, and a security
/// context that meets the "restricted" Pod Security profile.
fn container(s: &Settings, app_container: &str) -> Container {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector { field_path: path.to_owned(), ..Default::default() }),
        ..Default::default()
    };
    let env_from = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(field(path)),
        ..Default::default()
    };
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(s.admin_port)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let mut ports = vec![ContainerPort {
        name: Some("sidecar-admin".to_owned()),
        container_port: i32::from(s.admin_port),
        ..Default::default()
    }];
    ports.extend(s.ports.iter().map(|(name, p)| ContainerPort {
        name: Some(name.clone()),
        container_port: i32::from(*p),
        ..Default::default()
    }));
    let quantities = |pairs: [(&str, &Option<String>); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), Quantity(v.clone()))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    let mut mounts = vec![VolumeMount {
        name: VOLUME_CONFIG.to_owned(),
        mount_path: CONFIG_DIR.to_owned(),
        read_only: Some(true),
        ..Default::default()
    }];
    if s.tls_secret.is_some() {
        mounts.push(VolumeMount {
            name: VOLUME_TLS.to_owned(),
            mount_path: TLS_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: CONTAINER.to_owned(),
        image: Some(s.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(vec!["run".to_owned(), "-c".to_owned(), format!("{CONFIG_DIR}/sidecar.yaml")]),
        env: Some(vec![
            env_from("POD_NAME", "metadata.name"),
            env_from("POD_NAMESPACE", "metadata.namespace"),
            env_from("NODE_NAME", "spec.nodeName"),
            EnvVar {
                name: "CONTAINER_NAME".to_owned(),
                value: Some(app_container.to_owned()),
                ..Default::default()
            },
        ]),
        ports: Some(ports),
        // `/live`, not `/ready`, for start-up: a native sidecar must be started before the
        // app is, and `/ready` waits for the app.
        startup_probe: Some(probe("/live", 1, 30)),
        liveness_probe: Some(probe("/live", 10, 3)),
        readiness_probe: Some(probe("/ready", 2, 1)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                // Announce only: this hook runs when the pod starts terminating, beside the
                // app's; the drain itself follows the SIGTERM (README "Kubernetes").
                exec: Some(ExecAction {
                    command: Some(vec!["/sidecar".to_owned(), "drain".to_owned(), "--announce".to_owned()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities([("cpu", &s.cpu_request), ("memory", &s.memory_request)]),
            limits: quantities([("cpu", &s.cpu_limit), ("memory", &s.memory_limit)]),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
