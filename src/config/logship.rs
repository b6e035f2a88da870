//! The `logship` section: which files to tail, where their lines go, and how hard to try.
//!
//! Not responsible for reading files or sending (`crate::logship`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod auth;

pub use self::auth::{Auth, Secret};
use super::UpstreamTls;
use super::parse::{Ctx, Scalar, duration_str, parse_size};
use super::telemetry::Redacted;

/// A second: a new file is shipped soon after it appears, and 1,000 files cost 1,000 `stat`s
/// a second, nothing.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// As Fluent Bit's `rotate_wait`: an app that is slow to reopen its file after a rename keeps
/// writing to the old one for a moment.
pub const DEFAULT_ROTATE_WAIT: Duration = Duration::from_secs(5);
/// Vector's and Fluent Bit's default: a stack trace fits, a runaway line cannot eat memory.
pub const DEFAULT_MAX_LINE_BYTES: u64 = 1 << 20;
pub const DEFAULT_MULTILINE_TIMEOUT: Duration = Duration::from_secs(1);
/// Loki's and Elasticsearch's own advice is requests of a few MiB at most; 1 MiB keeps a
/// retry cheap.
pub const DEFAULT_BATCH_MAX_BYTES: u64 = 1 << 20;
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 10_000;
pub const DEFAULT_BATCH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// A sink back after an outage is found within 10 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_ES_INDEX: &str = "logs";
/// Loki labels every stream gets from the sidecar: `source`, and the pod's identity.
pub const RESERVED_LABELS: [&str; 5] = ["source", "namespace", "pod", "container", "node"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLogship {
    checkpoint_dir: Option<PathBuf>,
    read_from: Option<ReadFrom>,
    scan_interval: Option<Scalar>,
    rotate_wait: Option<Scalar>,
    cpu_priority: Option<CpuPriority>,
    sources: Vec<RawSource>,
    sinks: Vec<RawSink>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSource {
    name: Option<String>,
    paths: Vec<String>,
    exclude: Vec<String>,
    format: Option<SourceFormat>,
    multiline: Option<RawMultiline>,
    max_line_bytes: Option<Scalar>,
    fields: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMultiline {
    start_pattern: Option<String>,
    timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSink {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<SinkKind>,
    endpoint: Option<String>,
    headers: BTreeMap<String, String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    user: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    compression: Option<Compression>,
    encoding: Option<LokiEncoding>,
    labels: BTreeMap<String, String>,
    index: Option<String>,
    service_name: Option<String>,
    batch: RawBatch,
    retry: RawSinkRetry,
    request_timeout: Option<Scalar>,
    when_full: Option<WhenFull>,
    dead_letter: Option<PathBuf>,
    tls: Option<RawSinkTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBatch {
    max_events: Option<usize>,
    max_bytes: Option<Scalar>,
    timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSinkRetry {
    initial_backoff: Option<Scalar>,
    max_backoff: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSinkTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    Beginning,
    End,
}

/// How the shipper's thread competes with the proxy's for the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuPriority {
    /// `SCHED_IDLE`: the shipper runs on what the proxy leaves, so shipping never adds to a
    /// request's latency; under a saturated proxy the lag grows instead (the file is the
    /// buffer).
    Idle,
    /// The same share as the proxy's threads.
    Normal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Http,
    Loki,
    Elasticsearch,
    Otlp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LokiEncoding {
    Protobuf,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Reading pauses until the sink catches up: nothing is lost.
    Block,
    /// The sink skips what it has no room for (counted); the others still get it.
    DropNewest,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogshipConfig {
    pub checkpoint_dir: PathBuf,
    pub read_from: ReadFrom,
    #[serde(with = "duration_str")]
    pub scan_interval: Duration,
    #[serde(with = "duration_str")]
    pub rotate_wait: Duration,
    pub cpu_priority: CpuPriority,
    pub sources: Vec<SourceConfig>,
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceConfig {
    pub name: String,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub format: SourceFormat,
    pub multiline: Option<Multiline>,
    pub max_line_bytes: u64,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Multiline {
    /// A line matching this starts an event; the others are joined to the one before.
    pub start_pattern: String,
    /// The last event is sent this long after its last line came, if no new start came.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SinkConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// Where requests go: the base URL with the kind's path added (see `request_url`).
    pub endpoint: String,
    pub headers: Redacted,
    pub auth: Auth,
    pub compression: Compression,
    pub encoding: LokiEncoding,
    pub labels: BTreeMap<String, String>,
    pub index: String,
    pub service_name: Option<String>,
    pub max_events: usize,
    pub max_bytes: usize,
    #[serde(with = "duration_str")]
    pub batch_timeout: Duration,
    #[serde(with = "duration_str")]
    pub initial_backoff: Duration,
    #[serde(with = "duration_str")]
    pub max_backoff: Duration,
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    pub when_full: WhenFull,
    pub dead_letter: PathBuf,
    pub tls: Option<UpstreamTls>,
}

impl SinkConfig {
    /// The URL requests are POSTed to: an `http` sink's endpoint as written; for the others,
    /// a base URL (path `/`) gets the API's path, and a URL with a path is used as written
    /// (behind a gateway that maps it).
    pub fn request_url(&self) -> String {
        let path = match self.kind {
            SinkKind::Http => return self.endpoint.clone(),
            SinkKind::Loki => "/loki/api/v1/push",
            SinkKind::Elasticsearch => "/_bulk",
            SinkKind::Otlp => "/v1/logs",
        };
        match self.endpoint.parse::<http::Uri>() {
            Ok(u) if u.path() == "/" && u.query().is_none() => {
                format!("{}{path}", self.endpoint.trim_end_matches('/'))
            }
            _ => self.endpoint.clone(),
        }
    }
}

pub(super) fn validate(raw: RawLogship, cx: &mut Ctx) -> LogshipConfig {
    let checkpoint_dir = raw.checkpoint_dir.unwrap_or_else(|| {
        cx.bad("logship.checkpoint_dir", "missing: a directory that survives restarts (an emptyDir of the pod), for example /var/lib/sidecar");
        PathBuf::new()
    });
    if raw.sources.is_empty() {
        cx.bad(
            "logship.sources",
            "at least one source is needed: { name: app, paths: [\"/var/log/app/*.log\"] }",
        );
    }
    if raw.sinks.is_empty() {
        cx.bad("logship.sinks", "at least one sink is needed: { name: out, type: http, endpoint: \"http://collector:8080/logs\" }");
    }
    let sources: Vec<SourceConfig> =
        raw.sources.into_iter().enumerate().map(|(i, s)| validate_source(s, i, cx)).collect();
    let sinks: Vec<SinkConfig> =
        raw.sinks.into_iter().enumerate().map(|(i, s)| validate_sink(s, i, &checkpoint_dir, cx)).collect();
    unique_names(cx, "logship.sources", sources.iter().map(|s| s.name.as_str()));
    unique_names(cx, "logship.sinks", sinks.iter().map(|s| s.name.as_str()));
    LogshipConfig {
        checkpoint_dir,
        read_from: raw.read_from.unwrap_or(ReadFrom::Beginning),
        scan_interval: cx.positive_duration(
            "logship.scan_interval",
            raw.scan_interval.as_ref(),
            DEFAULT_SCAN_INTERVAL,
        ),
        rotate_wait: cx.duration("logship.rotate_wait", raw.rotate_wait.as_ref(), DEFAULT_ROTATE_WAIT),
        cpu_priority: raw.cpu_priority.unwrap_or(CpuPriority::Idle),
        sources,
        sinks,
    }
}

fn unique_names<'a>(cx: &mut Ctx, at: &str, names: impl Iterator<Item = &'a str>) {
    let mut seen = std::collections::HashSet::new();
    for (i, name) in names.enumerate() {
        if !name.is_empty() && !seen.insert(name) {
            cx.bad(format!("{at}[{i}].name"), format!("`{name}` is used twice"));
        }
    }
}

fn size(cx: &mut Ctx, path: &str, raw: Option<&Scalar>, default: u64) -> u64 {
    match raw.map(parse_size) {
        None => default,
        Some(Ok(0)) => {
            cx.bad(path, "must be more than 0");
            default
        }
        Some(Ok(n)) => n,
        Some(Err(m)) => {
            cx.bad(path, m);
            default
        }
    }
}

fn validate_source(raw: RawSource, i: usize, cx: &mut Ctx) -> SourceConfig {
    let at = format!("logship.sources[{i}]");
    let name = cx.name(&at, raw.name, "missing");
    if raw.paths.is_empty() {
        cx.bad(format!("{at}.paths"), "missing: globs of the files to tail, like /var/log/app/*.log");
    }
    for (j, p) in raw.paths.iter().chain(&raw.exclude).enumerate() {
        let field = if j < raw.paths.len() {
            format!("paths[{j}]")
        } else {
            format!("exclude[{}]", j - raw.paths.len())
        };
        if let Err(e) = glob::Pattern::new(p) {
            cx.bad(format!("{at}.{field}"), format!("`{p}` is not a glob: {e}"));
        } else if j < raw.paths.len() && !p.starts_with('/') {
            cx.bad(format!("{at}.{field}"), format!("`{p}` is not an absolute path"));
        }
    }
    let multiline = raw.multiline.map(|m| {
        let start_pattern = m.start_pattern.unwrap_or_else(|| {
            cx.bad(
                format!("{at}.multiline.start_pattern"),
                "missing: a regular expression that matches the first line of an event, like '^\\S'",
            );
            String::new()
        });
        if let Err(e) = regex::bytes::Regex::new(&start_pattern) {
            let first = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
            cx.bad(
                format!("{at}.multiline.start_pattern"),
                format!("`{start_pattern}` is not a regular expression: {first}"),
            );
        }
        Multiline {
            start_pattern,
            timeout: cx.positive_duration(
                &format!("{at}.multiline.timeout"),
                m.timeout.as_ref(),
                DEFAULT_MULTILINE_TIMEOUT,
            ),
        }
    });
    SourceConfig {
        name,
        paths: raw.paths,
        exclude: raw.exclude,
        format: raw.format.unwrap_or(SourceFormat::Text),
        multiline,
        max_line_bytes: size(
            cx,
            &format!("{at}.max_line_bytes"),
            raw.max_line_bytes.as_ref(),
            DEFAULT_MAX_LINE_BYTES,
        ),
        fields: raw.fields,
    }
}

fn validate_sink(raw: RawSink, i: usize, checkpoint_dir: &std::path::Path, cx: &mut Ctx) -> SinkConfig {
    let at = format!("logship.sinks[{i}]");
    let name = cx.name(&at, raw.name, "missing");
    let kind = raw.kind.unwrap_or_else(|| {
        cx.bad(format!("{at}.type"), "missing: http, loki, elasticsearch or otlp");
        SinkKind::Http
    });
    let endpoint = raw.endpoint.unwrap_or_default();
    match endpoint.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
        _ if endpoint.is_empty() => cx.bad(format!("{at}.endpoint"), "missing: the receiver's URL"),
        _ => cx.bad(format!("{at}.endpoint"), format!("`{endpoint}` is not an http:// or https:// URL")),
    }
    for (header, value) in &raw.headers {
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            cx.bad(format!("{at}.headers.{header}"), "not a header name");
        }
        // The value is not shown: headers carry tokens.
        if http::HeaderValue::from_str(value).is_err() {
            cx.bad(
                format!("{at}.headers.{header}"),
                "the value is not a valid header value (a control character or a line break?)",
            );
        }
    }
    let auth =
        auth::validate(&at, cx, (raw.token, raw.token_file), raw.user, (raw.password, raw.password_file));
    let only = |cx: &mut Ctx, field: &str, set: bool, kind_needed: SinkKind| {
        if set && kind != kind_needed {
            cx.bad(format!("{at}.{field}"), format!("only for `type: {}` sinks", serde_name(kind_needed)));
        }
    };
    only(cx, "encoding", raw.encoding.is_some(), SinkKind::Loki);
    only(cx, "labels", !raw.labels.is_empty(), SinkKind::Loki);
    only(cx, "index", raw.index.is_some(), SinkKind::Elasticsearch);
    only(cx, "service_name", raw.service_name.is_some(), SinkKind::Otlp);
    for label in raw.labels.keys() {
        let ok = label
            .chars()
            .enumerate()
            .all(|(j, c)| c == '_' || c.is_ascii_alphabetic() || (j > 0 && c.is_ascii_digit()));
        if !ok || label.is_empty() {
            cx.bad(
                format!("{at}.labels.{label}"),
                "not a Loki label name: letters, digits and `_`, not starting with a digit",
            );
        } else if RESERVED_LABELS.contains(&label.as_str()) {
            cx.bad(
                format!("{at}.labels.{label}"),
                "set by the sidecar itself (the source's name and the pod's identity)",
            );
        }
    }
    let max_events = match raw.batch.max_events {
        Some(0) => {
            cx.bad(format!("{at}.batch.max_events"), "must be at least 1");
            DEFAULT_BATCH_MAX_EVENTS
        }
        v => v.unwrap_or(DEFAULT_BATCH_MAX_EVENTS),
    };
    let initial_backoff = cx.positive_duration(
        &format!("{at}.retry.initial_backoff"),
        raw.retry.initial_backoff.as_ref(),
        DEFAULT_INITIAL_BACKOFF,
    );
    let max_backoff = cx.positive_duration(
        &format!("{at}.retry.max_backoff"),
        raw.retry.max_backoff.as_ref(),
        DEFAULT_MAX_BACKOFF,
    );
    if max_backoff < initial_backoff {
        cx.bad(format!("{at}.retry.max_backoff"), "is shorter than `initial_backoff`");
    }
    let tls = raw.tls.map(|t| UpstreamTls {
        ca: t.ca,
        cert: t.cert,
        key: t.key,
        server_name: t.server_name,
        identity: None,
    });
    if tls.is_some() && !endpoint.starts_with("https://") {
        cx.bad(format!("{at}.tls"), "set, but the endpoint is not https://");
    }
    let dead_letter =
        raw.dead_letter.unwrap_or_else(|| checkpoint_dir.join("dead-letter").join(format!("{name}.ndjson")));
    SinkConfig {
        kind,
        endpoint,
        headers: Redacted(raw.headers),
        auth,
        compression: raw.compression.unwrap_or(Compression::None),
        encoding: raw.encoding.unwrap_or(LokiEncoding::Protobuf),
        labels: raw.labels,
        index: raw.index.unwrap_or_else(|| DEFAULT_ES_INDEX.to_owned()),
        service_name: raw.service_name,
        max_events,
        max_bytes: size(
            cx,
            &format!("{at}.batch.max_bytes"),
            raw.batch.max_bytes.as_ref(),
            DEFAULT_BATCH_MAX_BYTES,
        ) as usize,
        batch_timeout: cx.positive_duration(
            &format!("{at}.batch.timeout"),
            raw.batch.timeout.as_ref(),
            DEFAULT_BATCH_TIMEOUT,
        ),
        initial_backoff,
        max_backoff,
        request_timeout: cx.positive_duration(
            &format!("{at}.request_timeout"),
            raw.request_timeout.as_ref(),
            DEFAULT_REQUEST_TIMEOUT,
        ),
        when_full: raw.when_full.unwrap_or(WhenFull::Block),
        dead_letter,
        tls,
        name,
    }
}

fn serde_name(kind: SinkKind) -> &'static str {
    match kind {
        SinkKind::Http => "http",
        SinkKind::Loki => "loki",
        SinkKind::Elasticsearch => "elasticsearch",
        SinkKind::Otlp => "otlp",
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse_str;

    const OK: &str = "logship:
  checkpoint_dir: /var/lib/sidecar
  sources: [{ name: app, paths: [\"/var/log/app/*.log\"] }]
  sinks:
    - { name: loki, type: loki, endpoint: \"http://loki:3100\", token: s3cret, headers: { X-Scope-OrgID: t1 } }
    - { name: es, type: elasticsearch, endpoint: \"https://es:9200/\", user: elastic, password_file: /proc/version }
";

    #[test]
    fn a_logship_only_config_runs_with_defaults_and_hides_its_secrets() {
        let c = parse_str(OK).expect("valid");
        assert!(c.inbound.is_empty() && c.outbound.is_empty());
        let l = c.logship.as_ref().unwrap();
        assert_eq!(l.sinks[0].request_url(), "http://loki:3100/loki/api/v1/push");
        assert_eq!(l.sinks[1].request_url(), "https://es:9200/_bulk");
        assert_eq!(l.sinks[1].dead_letter, std::path::Path::new("/var/lib/sidecar/dead-letter/es.ndjson"));
        assert_eq!(l.sources[0].max_line_bytes, 1 << 20);
        let shown = serde_yaml_ng::to_string(&c).unwrap();
        assert!(!shown.contains("s3cret") && !shown.contains("t1"), "{shown}");
        assert!(shown.contains("<redacted, from /proc/version>"), "{shown}");
    }

    #[test]
    fn bad_logship_fields_are_named() {
        let text = "logship:
  sources: [{ name: app, paths: [\"rel/*.log\"], multiline: { start_pattern: \"(\" } }]
  sinks:
    - { name: a, type: http, endpoint: \"ftp://x\", labels: { x: y } }
    - { name: a, type: loki, endpoint: \"http://l\", token: t, user: u, retry: { initial_backoff: 5s, max_backoff: 1s } }
";
        let shown = parse_str(text).unwrap_err().to_string();
        for needle in [
            "logship.checkpoint_dir: missing",
            "logship.sources[0].paths[0]: `rel/*.log` is not an absolute path",
            "logship.sources[0].multiline.start_pattern: `(` is not a regular expression",
            "logship.sinks[0].endpoint: `ftp://x` is not an http:// or https:// URL",
            "logship.sinks[0].labels: only for `type: loki` sinks",
            "logship.sinks[1].token: a sink takes a bearer token or a user and password, not both",
            "logship.sinks[1].retry.max_backoff: is shorter than `initial_backoff`",
            "logship.sinks[1].name: `a` is used twice",
        ] {
            assert!(shown.contains(needle), "missing {needle:?} in:\n{shown}");
        }
    }

    #[test]
    fn nothing_to_do_names_every_section_that_is_work() {
        let err = parse_str("admin: { listen: 127.0.0.1:15000 }\n").unwrap_err().to_string();
        assert!(
            err.contains("at least one of `inbound`, `outbound`, `logship` or `notify` is needed"),
            "{err}"
        );
    }
}
