//! The config file: raw serde types → `validate()` → the typed `Config` everything else uses.
//!
//! Loading reports *every* problem at once, each as `FILE: field.path: what is wrong`. This
//! file holds loading, the collect-every-structural-error loop and the top-level types; each
//! section's raw types, rules and defaults are in `config/<section>.rs`, the parsers they
//! share in `config/parse.rs`. It does not watch the file or apply a config; `app` does that.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

pub mod admin;
pub mod app;
pub mod inbound;
pub mod logship;
pub mod notify;
pub mod outbound;
mod parse;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;

pub use admin::AdminConfig;
pub use app::{AppConfig, HealthConfig, HttpVersion};
pub use inbound::{InboundConfig, InboundTls, Limits, Protocol};
pub use logship::LogshipConfig;
pub use notify::NotifyConfig;
pub use outbound::{
    Balance, EndpointName, OutboundConfig, OutlierConfig, RetryConfig, UpstreamConfig, UpstreamTls,
};
pub use parse::parse_socket_addr;
pub use runtime::RuntimeConfig;
pub use shutdown::ShutdownConfig;
pub use telemetry::{AccessLogConfig, AccessLogPath, LogFormat, TelemetryConfig, TracingConfig};

use parse::Ctx;

/// Safety net for the "remove the bad node and parse again" loop in `parse_raw`: a file with
/// more structural errors than this is reported with the first 64.
const MAX_STRUCTURAL_ERRORS: usize = 64;

/// What the rest of the program sees. Every value here has been validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub admin: AdminConfig,
    pub app: AppConfig,
    pub inbound: Vec<InboundConfig>,
    pub outbound: Vec<OutboundConfig>,
    pub logship: Option<LogshipConfig>,
    /// Config-change notifications to the app (`crate::k8s::notify`).
    pub notify: Vec<NotifyConfig>,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
    pub runtime: RuntimeConfig,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One thing wrong with a config file, at a field path like `inbound[0].limits.idle_timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.path.is_empty() {
                write!(f, "{}: {}", self.file.display(), p.message)?;
            } else {
                write!(f, "{}: {}: {}", self.file.display(), p.path, p.message)?;
            }
        }
        Ok(())
    }
}

/// The file as written. Optional everywhere, so that "missing" is reported by `validate` with
/// a path, together with every other problem.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    admin: admin::RawAdmin,
    app: app::RawApp,
    inbound: Vec<inbound::RawInbound>,
    outbound: Vec<outbound::RawOutbound>,
    telemetry: telemetry::RawTelemetry,
    logship: Option<logship::RawLogship>,
    notify: Vec<notify::RawNotify>,
    shutdown: shutdown::RawShutdown,
    runtime: runtime::RawRuntime,
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Reads, parses and validates `file`.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    parse(file, &read(file)?)
}

fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_owned(),
        problems: vec![Problem { path: String::new(), message: format!("cannot read the file: {e}") }],
    })
}

/// Parses and validates config text; `file` only names it in errors.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_with(file, text, validate)
}

/// Raw `R` → validated `C`: structural problems first, then what `validate` finds in the
/// rest of the file. Shared by the sidecar's config and the webhook's.
fn parse_with<R: serde::de::DeserializeOwned, C>(
    file: &Path,
    text: &str,
    validate: impl FnOnce(R, &mut Vec<Problem>) -> C,
) -> Result<C, ConfigError> {
    let fail = |problems| ConfigError { file: file.to_owned(), problems };
    let (raw, mut problems) = parse_raw::<R>(text).map_err(fail)?;
    let config = validate(raw, &mut problems);
    if problems.is_empty() { Ok(config) } else { Err(fail(problems)) }
}

/// YAML → raw types, collecting every structural error (unknown field, wrong type) rather
/// than the first: each error's node is removed and the parse tried again, so the raw config
/// returned is the file less its broken parts, ready for `validate` to find the rest.
fn parse_raw<T: serde::de::DeserializeOwned>(text: &str) -> Result<(T, Vec<Problem>), Vec<Problem>> {
    let mut value: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_yaml_ng::from_str(text)
            .map_err(|e| vec![Problem { path: String::new(), message: format!("not valid YAML: {e}") }])?
    };
    if value.is_null() {
        value = Value::Mapping(Default::default());
    }
    let mut problems: Vec<Problem> = Vec::new();
    loop {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(raw) => return Ok((raw, problems)),
            Err(err) => {
                let path = err.path().to_string();
                let message = err.inner().to_string();
                let segments = path_segments(&path);
                // serde's unknown-field error names the key; the path stops at its parent.
                let unknown = unknown_field_name(&message);
                let mut full = segments.clone();
                if let Some(key) = &unknown
                    && full.last() != Some(&Segment::Key(key.clone()))
                {
                    full.push(Segment::Key(key.clone()));
                }
                let shown = if path == "." { String::new() } else { path };
                let shown = match (&unknown, shown.is_empty()) {
                    (Some(k), true) => k.clone(),
                    (Some(k), false) if !shown.ends_with(k.as_str()) => format!("{shown}.{k}"),
                    _ => shown,
                };
                problems.push(Problem { path: shown, message: tidy_serde_message(&message) });
                if problems.len() >= MAX_STRUCTURAL_ERRORS || !remove_node(&mut value, &full) {
                    return Err(problems);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `inbound[0].limits.idle_timeout` → [Key(inbound), Index(0), Key(limits), Key(idle_timeout)].
fn path_segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    if path == "." {
        return out;
    }
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            if i > 0 {
                out.push(Segment::Key(rest[..i].to_owned()));
            }
            rest = &rest[i..];
            while let Some(end) = rest.find(']') {
                if let Ok(n) = rest[1..end].parse() {
                    out.push(Segment::Index(n));
                }
                rest = &rest[end + 1..];
            }
        } else if !rest.is_empty() && rest != "?" {
            out.push(Segment::Key(rest.to_owned()));
        }
    }
    out
}

fn unknown_field_name(message: &str) -> Option<String> {
    let rest =
        message.strip_prefix("unknown field `").or_else(|| message.strip_prefix("unknown variant `"))?;
    if message.starts_with("unknown variant") {
        return None;
    }
    Some(rest[..rest.find('`')?].to_owned())
}

/// Drops the node at `path` so the next parse can go past it. False when nothing was removed
/// (the loop would not make progress).
fn remove_node(value: &mut Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        node = match (seg, node) {
            (Segment::Key(k), Value::Mapping(m)) => match m.get_mut(k.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Index(i), Value::Sequence(s)) => match s.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        // Removing a list element would renumber the ones after it; an empty mapping keeps
        // the indices and lets `validate` report what the element lacks.
        (Segment::Index(i), Value::Sequence(s)) => match s.get_mut(*i) {
            Some(v) if matches!(&*v, Value::Mapping(m) if m.is_empty()) => false,
            Some(v) => {
                *v = Value::Mapping(Default::default());
                true
            }
            None => false,
        },
        _ => false,
    }
}

fn tidy_serde_message(message: &str) -> String {
    // "untagged enum Scalar" means nothing to a user.
    if message.contains("untagged enum Scalar") {
        return "expected a string like `5s` or `64KiB`, or a number".to_owned();
    }
    message.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Each section validates itself; the order here is the order problems are reported in.
fn validate(raw: RawConfig, problems: &mut Vec<Problem>) -> Config {
    let mut cx = Ctx::new(problems);
    let admin = admin::validate(raw.admin, &mut cx);
    let app = app::validate(raw.app, &mut cx);
    let inbound = inbound::validate(raw.inbound, &mut cx, admin.listen, &app.address);
    // Refused rather than ignored: a file written for a later build must not run here
    // without what it asks for.
    let outbound = outbound::validate(raw.outbound, &mut cx, admin.listen, &inbound);
    let logship = raw.logship.map(|l| logship::validate(l, &mut cx));
    let notify = notify::validate(raw.notify, &mut cx);
    if inbound.is_empty() && outbound.is_empty() && logship.is_none() && notify.is_empty() {
        cx.bad(
            "",
            "nothing to do: at least one of `inbound`, `outbound`, `logship` or `notify` is needed, for \
             example `inbound: [{ name: web, listen: 0.0.0.0:15006 }]`",
        );
    }
    let telemetry = telemetry::validate(raw.telemetry, &mut cx);
    let shutdown = shutdown::validate(raw.shutdown, &mut cx);
    let runtime = runtime::validate(raw.runtime, &mut cx);
    Config { admin, app, inbound, outbound, logship, notify, telemetry, shutdown, runtime }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The smallest useful config (INTERFACE.md): one listener, everything else defaulted.
    pub(super) const SMALLEST: &str = "inbound:\n  - { name: web, listen: 0.0.0.0:15006 }\n";

    /// Parses `text` as if it were `sidecar.yaml`; the section tests use it too.
    pub(super) fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("sidecar.yaml"), text)
    }

    /// `SMALLEST`, parsed; the section tests check their default constants against it.
    pub(super) fn smallest() -> Config {
        parse_str(SMALLEST).expect("the smallest config is valid")
    }

    // The literals here, not the constants, on purpose: a changed default is a change of the
    // public contract and should fail a test.
    #[test]
    fn smallest_config_gets_safe_defaults() {
        let c = smallest();
        assert_eq!(c.admin.listen, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.app.address.to_string(), "127.0.0.1:8080");
        assert_eq!(c.inbound[0].target, c.app.address);
        assert_eq!(c.inbound[0].protocol, Protocol::Http);
        assert_eq!(c.inbound[0].limits.max_header_bytes, 65536);
        assert_eq!(c.inbound[0].limits.max_connections, 10_000);
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(20));
        assert!(c.telemetry.access_log.enabled);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = "
admin: { listen: nowhere }
inbound:
  - name: web
    listn: 0.0.0.0:1
    limits: { idle_timeout: 5 parsecs, max_header_bytes: 12 furlongs, max_connections: many }
  - { listen: 127.0.0.1:2, protocol: udp }
shutdown: { drain_timeout: 5 }
";
        let err = parse_str(text).unwrap_err();
        let shown = err.to_string();
        for needle in [
            "sidecar.yaml: inbound[0].listn: unknown field `listn`",
            "sidecar.yaml: inbound[0].limits.max_connections: invalid type",
            "sidecar.yaml: inbound[1].protocol: unknown variant `udp`",
            "sidecar.yaml: admin.listen: `nowhere` is not an address",
            "sidecar.yaml: inbound[0].listen: missing",
            "sidecar.yaml: inbound[0].limits.idle_timeout: `5 parsecs` is not a duration",
            "sidecar.yaml: inbound[0].limits.max_header_bytes: `12 furlongs` is not a size",
            "sidecar.yaml: inbound[1].name: missing",
            "sidecar.yaml: shutdown.drain_timeout: `5` has no unit",
        ] {
            assert!(shown.contains(needle), "missing {needle:?} in:\n{shown}");
        }
    }

    #[test]
    fn unknown_top_level_field_is_an_error() {
        let err = parse_str("inbound: [{name: a, listen: 127.0.0.1:1}]\nadmn: {}\n").unwrap_err();
        assert_eq!(err.problems[0].path, "admn");
    }

    /// A file written for a later build must fail here, each unbuilt section with its own
    /// message at its own path, and nothing else reported.
    #[test]
    fn unbuilt_sections_and_bad_values_are_refused_each_at_its_own_path() {
        for (section, path, message) in [
            (
                "logship: { checkpoint_dir: /tmp/x, read_from: middle, sources: [{ name: app, paths: [/a/*.log] }], sinks: [{ name: s, type: http, endpoint: \"http://x\" }] }",
                "logship.read_from",
                "unknown variant `middle`, expected `beginning` or `end`",
            ),
            (
                "telemetry: { tracing: { otlp_endpoint: \"grpc://collector:4317\" } }",
                "telemetry.tracing.otlp_endpoint",
                "`grpc://collector:4317` is not an http:// URL",
            ),
            (
                "telemetry: { tracing: { sample_ratio: 1.5 } }",
                "telemetry.tracing.sample_ratio",
                "1.5 is not between 0 and 1",
            ),
        ] {
            let err = parse_str(&format!("{SMALLEST}{section}\n")).unwrap_err();
            assert_eq!(
                err.problems,
                [Problem { path: path.to_owned(), message: message.to_owned() }],
                "for {section}"
            );
        }
    }
}
