//! The admission webhook's own file (`sidecar webhook -c FILE`): where it listens, its
//! serving certificate, what it answers when it cannot handle a request, and the injection
//! defaults pods' annotations start from.
//!
//! Not the sidecar's config: a webhook runs in its own Deployment, not beside an app.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::admin::{AdminConfig, RawAdmin};
use super::parse::{Ctx, Scalar};
use super::{ConfigError, LogFormat, Problem, parse_with, read};
use crate::k8s::inject::Settings;

/// Where the API server calls; 8443 because the image runs as a non-root user, which may
/// not bind ports below 1024 (the Service maps 443 to it).
pub const DEFAULT_WEBHOOK_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8443);
/// The API server's own default `timeoutSeconds` is 10 s and ours in deploy/ is 5 s: an
/// answer must come well within it, or the API server applies the failure policy itself.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(4);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawFile {
    webhook: RawWebhook,
    admin: RawAdmin,
    telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebhook {
    listen: Option<String>,
    tls: Option<RawTls>,
    failure_policy: Option<FailurePolicy>,
    request_timeout: Option<Scalar>,
    inject: RawInject,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInject {
    image: Option<String>,
    config_map: Option<String>,
    native: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTelemetry {
    log_level: Option<String>,
    log_format: Option<LogFormat>,
}

/// What the webhook answers for a request it cannot handle (an object it cannot parse, an
/// annotation it cannot use). Match the `failurePolicy` of the MutatingWebhookConfiguration,
/// which decides the same when the webhook cannot be reached at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Let the object through unchanged, with a warning: a webhook problem never stops pods.
    Ignore,
    /// Refuse the object, saying why: no pod runs without its sidecar.
    Fail,
}

/// The webhook file, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookFile {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub failure_policy: FailurePolicy,
    /// The longest a review may take, body read included.
    pub request_timeout: Duration,
    pub inject: Settings,
    pub admin: AdminConfig,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// Reads, parses and validates the webhook's file; every problem named, as for the sidecar's.
pub fn load(file: &Path) -> Result<WebhookFile, ConfigError> {
    parse(file, &read(file)?)
}

pub fn parse(file: &Path, text: &str) -> Result<WebhookFile, ConfigError> {
    parse_with(file, text, validate)
}

fn validate(raw: RawFile, problems: &mut Vec<Problem>) -> WebhookFile {
    let mut cx = Ctx::new(problems);
    let w = raw.webhook;
    let listen = w.listen.map_or(DEFAULT_WEBHOOK_LISTEN, |l| cx.addr("webhook.listen", &l));
    let tls = w.tls.unwrap_or_default();
    // The API server only calls webhooks over HTTPS.
    let mut file = |field: &str, p: Option<PathBuf>| match p {
        Some(p) if p.is_absolute() => p,
        Some(p) => {
            cx.bad(format!("webhook.tls.{field}"), format!("`{}` is not an absolute path", p.display()));
            p
        }
        None => {
            cx.bad(format!("webhook.tls.{field}"), "missing: the API server calls webhooks over HTTPS only");
            PathBuf::new()
        }
    };
    let cert = file("cert", tls.cert);
    let key = file("key", tls.key);
    let request_timeout =
        cx.positive_duration("webhook.request_timeout", w.request_timeout.as_ref(), DEFAULT_REQUEST_TIMEOUT);
    let mut inject = Settings::default();
    if let Some(image) = w.inject.image {
        if image.is_empty() || image.contains(char::is_whitespace) {
            cx.bad("webhook.inject.image", format!("`{image}` is not an image"));
        }
        inject.image = image;
    }
    if let Some(name) = w.inject.config_map {
        match inject.with_annotations(&[Some(&[("sidecar.dev/config".to_owned(), name.clone())].into())]) {
            Ok(s) => inject = s,
            Err(e) => cx.bad("webhook.inject.config_map", e.message),
        }
    }
    inject.native = w.inject.native.unwrap_or(true);
    let admin = super::admin::validate(raw.admin, &mut cx);
    if admin.listen == listen && listen.port() != 0 {
        cx.bad("admin.listen", format!("{listen} is webhook.listen too"));
    }
    let log_level = raw.telemetry.log_level.unwrap_or_else(|| super::telemetry::DEFAULT_LOG_LEVEL.to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
        cx.bad("telemetry.log_level", format!("`{log_level}` is not a log filter: {e}"));
    }
    WebhookFile {
        listen,
        cert,
        key,
        failure_policy: w.failure_policy.unwrap_or(FailurePolicy::Ignore),
        request_timeout,
        inject,
        admin,
        log_level,
        log_format: raw.telemetry.log_format.unwrap_or(super::telemetry::DEFAULT_LOG_FORMAT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<WebhookFile, ConfigError> {
        parse(Path::new("webhook.yaml"), text)
    }

    #[test]
    fn the_smallest_file_names_its_certificate_and_gets_safe_defaults() {
        let w = parse_str("webhook: { tls: { cert: /tls/tls.crt, key: /tls/tls.key } }").unwrap();
        assert_eq!(w.listen, DEFAULT_WEBHOOK_LISTEN);
        assert_eq!(w.failure_policy, FailurePolicy::Ignore);
        assert_eq!(w.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(w.inject, Settings::default());
        assert_eq!(w.admin.listen, super::super::admin::DEFAULT_ADMIN_LISTEN);
    }

    #[test]
    fn every_problem_is_named() {
        let err = parse_str(
            "webhook:\n  listen: nowhere\n  tls: { cert: tls.crt }\n  failure_policy: maybe\n  inject: { config_map: Not_A_Name, image: '' }\n  request_timeout: 0s\ntelemetry: { log_level: 'x=[' }\nextra: 1\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "webhook.yaml: extra: unknown field",
            "webhook.yaml: webhook.failure_policy: unknown variant `maybe`",
            "webhook.yaml: webhook.listen: `nowhere` is not an address",
            "webhook.yaml: webhook.tls.cert: `tls.crt` is not an absolute path",
            "webhook.yaml: webhook.tls.key: missing",
            "webhook.yaml: webhook.inject.image: `` is not an image",
            "webhook.yaml: webhook.inject.config_map: `Not_A_Name` is not a valid object name",
            "webhook.yaml: webhook.request_timeout:",
            "webhook.yaml: telemetry.log_level:",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }
}
