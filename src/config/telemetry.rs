//! The `telemetry` section: the process's own log filter and format, and the access log.
//!
//! Not responsible for installing the subscriber or writing records (`crate::telemetry`).
//! `telemetry.tracing` (OTLP) is in the contract but not built: it is refused here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use super::parse::Ctx;

// Defaults are the contract's (INTERFACE.md) unless a comment says otherwise.

/// Start-up, reloads, readiness changes and errors, without a line per request.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Not in the contract; README documents it: the process's own logs are read by people
/// (`kubectl logs`) more often than by machines, which have the access log.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// On: the access log is one of the things the sidecar is there to provide.
pub const DEFAULT_ACCESS_LOG_ENABLED: bool = true;
/// The only format built: one JSON record a line, fields as INTERFACE.md lists them.
pub const DEFAULT_ACCESS_LOG_FORMAT: LogFormat = LogFormat::Json;
/// Stdout is what a container runtime collects without a volume.
pub const DEFAULT_ACCESS_LOG_PATH: AccessLogPath = AccessLogPath::Stdout;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTelemetry {
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    access_log: RawAccessLog,
    /// Any value: only its presence is looked at, to refuse it.
    tracing: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAccessLog {
    enabled: Option<bool>,
    format: Option<LogFormat>,
    path: Option<String>,
}

pub(super) fn validate(raw: RawTelemetry, cx: &mut Ctx) -> TelemetryConfig {
    // Refused rather than ignored: a file written for a later build must not run here
    // without the tracing it asks for.
    if raw.tracing.is_some() {
        cx.bad("telemetry.tracing", "OTLP tracing is not in this build yet; remove `telemetry.tracing`");
    }
    let log_level = raw.log_level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
        cx.bad("telemetry.log_level", format!("`{log_level}` is not a log filter: {e}"));
    }
    TelemetryConfig {
        log_level,
        log_format: raw.log_format.unwrap_or(DEFAULT_LOG_FORMAT),
        access_log: validate_access_log(raw.access_log, cx),
    }
}

fn validate_access_log(al: RawAccessLog, cx: &mut Ctx) -> AccessLogConfig {
    let format = al.format.unwrap_or(DEFAULT_ACCESS_LOG_FORMAT);
    if format != LogFormat::Json {
        cx.bad("telemetry.access_log.format", "only `json` is supported");
    }
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
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessLogConfig {
    /// One record per request. Default [`DEFAULT_ACCESS_LOG_ENABLED`], true.
    pub enabled: bool,
    /// Only `json` today. Default [`DEFAULT_ACCESS_LOG_FORMAT`], `json`.
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
    }
}
