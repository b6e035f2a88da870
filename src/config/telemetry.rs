//! The `telemetry` section: the process's own log filter and format, and the access log.
//!
//! Not responsible for installing the subscriber, writing records or exporting spans
//! (`crate::telemetry`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Ctx, Scalar, duration_str};

// Defaults are the contract's (INTERFACE.md) unless a comment says otherwise.

/// Start-up, reloads, readiness changes and errors, without a line per request.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Not in the contract; README documents it: the process's own logs are read by people
/// (`kubectl logs`) more often than by machines, which have the access log.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// On: the access log is one of the things the sidecar is there to provide.
pub const DEFAULT_ACCESS_LOG_ENABLED: bool = true;
/// One JSON record a line, fields as INTERFACE.md lists them; `text` is the human form.
pub const DEFAULT_ACCESS_LOG_FORMAT: LogFormat = LogFormat::Json;
/// Stdout is what a container runtime collects without a volume.
pub const DEFAULT_ACCESS_LOG_PATH: AccessLogPath = AccessLogPath::Stdout;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTelemetry {
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    access_log: RawAccessLog,
    tracing: Option<RawTracing>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTracing {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
    headers: BTreeMap<String, String>,
    resource: BTreeMap<String, String>,
    queue_size: Option<usize>,
    batch_size: Option<usize>,
    batch_timeout: Option<Scalar>,
    export_timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAccessLog {
    enabled: Option<bool>,
    format: Option<LogFormat>,
    path: Option<String>,
}

pub(super) fn validate(raw: RawTelemetry, cx: &mut Ctx) -> TelemetryConfig {
    let log_level = raw.log_level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
        cx.bad("telemetry.log_level", format!("`{log_level}` is not a log filter: {e}"));
    }
    TelemetryConfig {
        log_level,
        log_format: raw.log_format.unwrap_or(DEFAULT_LOG_FORMAT),
        access_log: validate_access_log(raw.access_log, cx),
        tracing: raw.tracing.map(|t| validate_tracing(t, cx)),
    }
}

fn validate_tracing(t: RawTracing, cx: &mut Ctx) -> TracingConfig {
    let endpoint = t.otlp_endpoint.unwrap_or_else(|| DEFAULT_OTLP_ENDPOINT.to_owned());
    let otlp_endpoint = match endpoint.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => {
            // The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: the signal's path is added. A URL
            // with a path of its own is used as written, as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
            if u.path() == "/" { format!("{}/v1/traces", endpoint.trim_end_matches('/')) } else { endpoint }
        }
        Ok(u) if u.scheme_str() == Some("https") => {
            cx.bad(
                "telemetry.tracing.otlp_endpoint",
                "https is not supported yet: send to a collector on the pod's network or node over http",
            );
            endpoint
        }
        _ => {
            cx.bad("telemetry.tracing.otlp_endpoint", format!("`{endpoint}` is not an http:// URL"));
            endpoint
        }
    };
    let sample_ratio = t.sample_ratio.unwrap_or(DEFAULT_SAMPLE_RATIO);
    if !(0.0..=1.0).contains(&sample_ratio) {
        cx.bad("telemetry.tracing.sample_ratio", format!("{sample_ratio} is not between 0 and 1"));
    }
    for name in t.headers.keys() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            cx.bad(format!("telemetry.tracing.headers.{name}"), "not a header name");
        }
    }
    let size = |cx: &mut Ctx, field: &str, v: Option<usize>, default: usize| match v {
        Some(0) => {
            cx.bad(format!("telemetry.tracing.{field}"), "must be at least 1");
            default
        }
        v => v.unwrap_or(default),
    };
    let queue_size = size(cx, "queue_size", t.queue_size, DEFAULT_QUEUE_SIZE);
    let batch_size = size(cx, "batch_size", t.batch_size, DEFAULT_BATCH_SIZE);
    TracingConfig {
        otlp_endpoint,
        service_name: t.service_name.or_else(|| std::env::var("OTEL_SERVICE_NAME").ok()),
        sample_ratio,
        headers: Redacted(t.headers),
        resource: t.resource,
        queue_size,
        batch_size: batch_size.min(queue_size),
        batch_timeout: cx.positive_duration(
            "telemetry.tracing.batch_timeout",
            t.batch_timeout.as_ref(),
            DEFAULT_BATCH_TIMEOUT,
        ),
        export_timeout: cx.positive_duration(
            "telemetry.tracing.export_timeout",
            t.export_timeout.as_ref(),
            DEFAULT_EXPORT_TIMEOUT,
        ),
    }
}

fn validate_access_log(al: RawAccessLog, cx: &mut Ctx) -> AccessLogConfig {
    let format = al.format.unwrap_or(DEFAULT_ACCESS_LOG_FORMAT);
    let path = match al.path.as_deref() {
        None => DEFAULT_ACCESS_LOG_PATH,
        Some("stdout") | Some("-") => AccessLogPath::Stdout,
        Some("") => {
            cx.bad("telemetry.access_log.path", "empty: use `stdout` or a file path");
            AccessLogPath::Stdout
        }
        Some(p) => AccessLogPath::File(PathBuf::from(p)),
    };
    AccessLogConfig { enabled: al.enabled.unwrap_or(DEFAULT_ACCESS_LOG_ENABLED), format, path }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryConfig {
    /// A tracing filter: `info`, `sidecar=debug,hyper=warn`. Default [`DEFAULT_LOG_LEVEL`],
    /// `info`.
    pub log_level: String,
    /// Format of the process's own logs on stderr. Default [`DEFAULT_LOG_FORMAT`], `text`.
    pub log_format: LogFormat,
    pub access_log: AccessLogConfig,
    /// Spans exported over OTLP; none when the section is absent.
    pub tracing: Option<TracingConfig>,
}

/// A collector on the same host, as OpenTelemetry's own default.
pub const DEFAULT_OTLP_ENDPOINT: &str = "http://127.0.0.1:4318";
/// Every request, as the contract's example: a sidecar's span is cheap and most pods see
/// modest traffic; busy ones lower it.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
/// Spans waiting for export (OpenTelemetry's BatchSpanProcessor default): past it, spans are
/// dropped and counted, never waited for.
pub const DEFAULT_QUEUE_SIZE: usize = 2048;
/// Spans per export request (OpenTelemetry's default).
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// Longest a span waits for its batch to fill. OpenTelemetry's 5 s is for apps; a proxy's
/// spans are wanted while the request is still on the operator's mind.
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_secs(1);
/// One export request, retries included (OpenTelemetry's default).
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingConfig {
    /// Where spans go over OTLP/HTTP (protobuf). A base URL gets `/v1/traces`; a URL with a
    /// path is used as written. Default [`DEFAULT_OTLP_ENDPOINT`].
    pub otlp_endpoint: String,
    /// The resource's `service.name`; else `OTEL_SERVICE_NAME`, else `sidecar`.
    pub service_name: Option<String>,
    /// Share of new traces recorded; a caller's decision is kept. Default 1.0.
    pub sample_ratio: f64,
    /// Sent with every export (tokens): names shown, values redacted in `/config`.
    pub headers: Redacted,
    /// More resource attributes (`deployment.environment: prod`).
    pub resource: BTreeMap<String, String>,
    pub queue_size: usize,
    pub batch_size: usize,
    #[serde(with = "duration_str")]
    pub batch_timeout: Duration,
    #[serde(with = "duration_str")]
    pub export_timeout: Duration,
}

/// Header values that are secrets: the names are shown, the values never are.
#[derive(Clone, PartialEq, Default)]
pub struct Redacted(pub BTreeMap<String, String>);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.0.keys().map(|k| (k, "<redacted>"))).finish()
    }
}

impl Serialize for Redacted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.keys().map(|k| (k, "<redacted>")))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessLogConfig {
    /// One record per request. Default [`DEFAULT_ACCESS_LOG_ENABLED`], true.
    pub enabled: bool,
    /// `json` or `text` (one human line). Default [`DEFAULT_ACCESS_LOG_FORMAT`], `json`.
    pub format: LogFormat,
    /// `stdout` (or `-`) or a file. Default [`DEFAULT_ACCESS_LOG_PATH`], stdout.
    pub path: AccessLogPath,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogPath {
    Stdout,
    File(PathBuf),
}

impl Serialize for AccessLogPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccessLogPath::Stdout => s.serialize_str("stdout"),
            AccessLogPath::File(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::smallest;

    #[test]
    fn defaults_are_what_the_smallest_config_gets() {
        let t = smallest().telemetry;
        assert_eq!(t.log_level, DEFAULT_LOG_LEVEL);
        assert_eq!(t.log_format, DEFAULT_LOG_FORMAT);
        let access_log = AccessLogConfig {
            enabled: DEFAULT_ACCESS_LOG_ENABLED,
            format: DEFAULT_ACCESS_LOG_FORMAT,
            path: DEFAULT_ACCESS_LOG_PATH,
        };
        assert_eq!(t.access_log, access_log);
        assert_eq!(t.tracing, None);
    }
}
