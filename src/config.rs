//! The config file: raw serde types → `validate()` → the typed `Config` everything else uses.
//!
//! Loading reports *every* problem at once, each as `FILE: field.path: what is wrong`. It does
//! not watch the file or apply a config; `app` does that.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// Safety net for the "remove the bad node and parse again" loop in `parse_raw`: a file with
/// more structural errors than this is reported with the first 64.
const MAX_STRUCTURAL_ERRORS: usize = 64;

// ---------------------------------------------------------------------------------------------
// Typed config: what the rest of the program sees. Every value here has been validated.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub admin: AdminConfig,
    pub app: AppConfig,
    pub inbound: Vec<InboundConfig>,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    /// Where the admin server listens. Default 127.0.0.1:15000: never a public address unless
    /// the file says so, because `/shutdown` and `/log-level` change the process.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    Http1,
    Http2,
    /// What the app speaks: HTTP/2 clients stay on HTTP/2 when the app answers an HTTP/2
    /// PING (gRPC servers, h2c-capable servers), and are translated to HTTP/1.1 when it does
    /// not; HTTP/1.1 clients stay on HTTP/1.1.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppConfig {
    /// Where the application listens. Default 127.0.0.1:8080.
    pub address: SocketAddr,
    /// What the app speaks. Default `auto`.
    pub http: HttpVersion,
    /// How `/ready` learns the app is healthy. `None`: a TCP connect to `address`.
    pub health: Option<HealthConfig>,
    /// Interval and timeout of the TCP connect check used when `health` is omitted.
    #[serde(with = "duration_str")]
    pub tcp_check_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthConfig {
    /// HTTP GET path; a 2xx answer means healthy. Default `/healthz`.
    pub path: String,
    /// Time between checks. Default 1s.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// How long one check may take. Default 1s.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// Where connections go. Default `app.address`.
    pub target: SocketAddr,
    pub limits: Limits,
    /// Terminate TLS here. `None`: plain text.
    pub tls: Option<InboundTls>,
    /// Longest wait for the app's response headers before answering 504. Default 15s, Envoy's
    /// route timeout; 0s turns it off. Streaming bodies are not cut by it.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    /// Longest wait for a TCP connect to the target. Default 1s.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundTls {
    /// PEM certificate chain, leaf first. Reloaded when the file changes.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Only its path is ever shown.
    pub key: PathBuf,
    /// PEM CA bundle. Set: clients must present a certificate chaining to it (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Client identities (SPIFFE IDs or DNS names) let through; empty: any verified client.
    pub allowed_identities: Vec<String>,
    /// Longest a TLS handshake may take. Default 10s.
    #[serde(with = "duration_str")]
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Largest request head (request line and headers) accepted; more gets 431. Default 64KiB.
    pub max_header_bytes: usize,
    /// How long a client may take to send a request head; slower ones are cut. Default 10s.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving this long is closed.
    /// Default 60s.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Open connections on this listener; more are accepted and closed at once. Default 10000.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryConfig {
    /// A tracing filter: `info`, `sidecar=debug,hyper=warn`. Default `info`.
    pub log_level: String,
    /// Format of the process's own logs on stderr. Default `text`.
    pub log_format: LogFormat,
    pub access_log: AccessLogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessLogConfig {
    /// Default true.
    pub enabled: bool,
    /// Only `json` today. Default `json`.
    pub format: LogFormat,
    /// Default stdout.
    pub path: AccessLogPath,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogPath {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShutdownConfig {
    /// Longest wait for in-flight requests after a drain begins. Default 20s.
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeConfig {
    /// Worker threads of the data plane. 0 (default): one per CPU this process may use.
    pub worker_threads: usize,
}

impl Serialize for AccessLogPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccessLogPath::Stdout => s.serialize_str("stdout"),
            AccessLogPath::File(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

mod duration_str {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
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

// ---------------------------------------------------------------------------------------------
// Raw types: the file as written. Optional everywhere so that "missing" is reported by
// `validate` with a path, together with every other problem.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    admin: RawAdmin,
    app: RawApp,
    inbound: Vec<RawInbound>,
    outbound: Option<Value>,
    telemetry: RawTelemetry,
    logship: Option<Value>,
    shutdown: RawShutdown,
    runtime: RawRuntime,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApp {
    address: Option<String>,
    http: Option<HttpVersion>,
    health: Option<RawHealth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    path: Option<String>,
    interval: Option<Scalar>,
    timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInbound {
    name: Option<String>,
    listen: Option<String>,
    protocol: Option<Protocol>,
    target: Option<String>,
    tls: Option<RawTls>,
    limits: RawLimits,
    request_timeout: Option<Scalar>,
    connect_timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    allowed_identities: Vec<String>,
    handshake_timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_header_bytes: Option<Scalar>,
    header_read_timeout: Option<Scalar>,
    idle_timeout: Option<Scalar>,
    max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTelemetry {
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    access_log: RawAccessLog,
    tracing: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAccessLog {
    enabled: Option<bool>,
    format: Option<LogFormat>,
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawShutdown {
    drain_timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRuntime {
    worker_threads: Option<u64>,
}

/// A duration or size as written: `5s` and `64KiB` are strings, a bare `65536` is a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Int(u64),
    Str(String),
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Reads, parses and validates `file`.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_owned(),
        problems: vec![Problem { path: String::new(), message: format!("cannot read the file: {e}") }],
    })?;
    parse(file, &text)
}

/// Parses and validates config text; `file` only names it in errors.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError { file: file.to_owned(), problems };
    let (raw, mut problems) = parse_raw(text).map_err(fail)?;
    // Structural problems first, then what validation finds in the rest of the file.
    let config = validate(raw, &mut problems);
    if problems.is_empty() { Ok(config) } else { Err(fail(problems)) }
}

/// YAML → raw types, collecting every structural error (unknown field, wrong type) rather
/// than the first: each error's node is removed and the parse tried again, so the raw config
/// returned is the file less its broken parts, ready for `validate` to find the rest.
fn parse_raw(text: &str) -> Result<(RawConfig, Vec<Problem>), Vec<Problem>> {
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
        match serde_path_to_error::deserialize::<_, RawConfig>(value.clone()) {
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

struct Ctx<'a> {
    problems: &'a mut Vec<Problem>,
}

impl Ctx<'_> {
    fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into() });
    }

    fn addr(&mut self, path: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let text = raw.unwrap_or(default);
        match parse_socket_addr(text) {
            Ok(a) => a,
            Err(m) => {
                self.bad(path, m);
                // Placeholder so validation can go on; the config is rejected anyway.
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    fn duration(&mut self, path: &str, raw: Option<&Scalar>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) => d,
                Err(m) => {
                    self.bad(path, m);
                    default
                }
            },
        }
    }

    fn positive_duration(&mut self, path: &str, raw: Option<&Scalar>, default: Duration) -> Duration {
        let d = self.duration(path, raw, default);
        if d.is_zero() {
            self.bad(path, "must be longer than 0s");
        }
        d
    }
}

fn validate(raw: RawConfig, problems: &mut Vec<Problem>) -> Config {
    let mut cx = Ctx { problems };

    let admin =
        AdminConfig { listen: cx.addr("admin.listen", raw.admin.listen.as_deref(), "127.0.0.1:15000") };

    let app_address = cx.addr("app.address", raw.app.address.as_deref(), "127.0.0.1:8080");
    let health = raw.app.health.map(|h| {
        let path = h.path.unwrap_or_else(|| "/healthz".to_owned());
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            cx.bad(
                "app.health.path",
                format!("`{path}` is not a path: it must start with `/` and have no spaces"),
            );
        }
        let interval =
            cx.positive_duration("app.health.interval", h.interval.as_ref(), Duration::from_secs(1));
        let timeout = cx.positive_duration("app.health.timeout", h.timeout.as_ref(), Duration::from_secs(1));
        HealthConfig { path, interval, timeout }
    });
    let app = AppConfig {
        address: app_address,
        http: raw.app.http.unwrap_or(HttpVersion::Auto),
        health,
        tcp_check_interval: Duration::from_secs(1),
    };

    if raw.inbound.is_empty() {
        cx.bad(
            "inbound",
            "at least one listener is needed, for example `- { name: web, listen: 0.0.0.0:15006 }`",
        );
    }
    let mut inbound: Vec<InboundConfig> = Vec::with_capacity(raw.inbound.len());
    for (i, r) in raw.inbound.into_iter().enumerate() {
        let at = |f: &str| format!("inbound[{i}].{f}");
        let name = match r.name {
            Some(n) if valid_name(&n) => n,
            Some(n) => {
                cx.bad(at("name"), format!("`{n}` is not a valid name: use letters, digits, `-` and `_`"));
                n
            }
            None => {
                cx.bad(at("name"), "missing: every listener needs a name (it labels metrics and logs)");
                format!("inbound-{i}")
            }
        };
        if inbound.iter().any(|o| o.name == name) {
            cx.bad(at("name"), format!("`{name}` is used by another listener"));
        }
        let listen = match r.listen.as_deref() {
            Some(l) => cx.addr(&at("listen"), Some(l), ""),
            None => {
                cx.bad(at("listen"), "missing: the address to listen on, like `0.0.0.0:15006`");
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        if listen.port() != 0 {
            if inbound.iter().any(|o| o.listen == listen) {
                cx.bad(at("listen"), format!("{listen} is used by another listener"));
            }
            if listen == admin.listen {
                cx.bad(at("listen"), format!("{listen} is the admin server's address"));
            }
        }
        let target = match r.target.as_deref() {
            Some(t) => cx.addr(&at("target"), Some(t), ""),
            None => app.address,
        };
        let tls = r.tls.map(|t| {
            let mut file = |field: &str, v: Option<PathBuf>| {
                v.unwrap_or_else(|| {
                    cx.bad(at(&format!("tls.{field}")), "missing: a PEM file path");
                    PathBuf::new()
                })
            };
            let cert = file("cert", t.cert);
            let key = file("key", t.key);
            if !t.allowed_identities.is_empty() && t.client_ca.is_none() {
                cx.bad(
                    at("tls.allowed_identities"),
                    "needs `client_ca`: without client certificates no identity is known",
                );
            }
            if t.allowed_identities.iter().any(|i| i.trim().is_empty()) {
                cx.bad(at("tls.allowed_identities"), "an identity is empty");
            }
            InboundTls {
                cert,
                key,
                client_ca: t.client_ca,
                allowed_identities: t.allowed_identities,
                handshake_timeout: cx.positive_duration(
                    &at("tls.handshake_timeout"),
                    t.handshake_timeout.as_ref(),
                    Duration::from_secs(10),
                ),
            }
        });
        let lim = r.limits;
        let max_header_bytes = match &lim.max_header_bytes {
            None => 64 * 1024,
            Some(s) => match parse_size(s) {
                Ok(n) if (1024..=1024 * 1024).contains(&n) => n as usize,
                Ok(n) => {
                    cx.bad(at("limits.max_header_bytes"), format!("{n} bytes is outside 1KiB..1MiB"));
                    64 * 1024
                }
                Err(m) => {
                    cx.bad(at("limits.max_header_bytes"), m);
                    64 * 1024
                }
            },
        };
        let limits = Limits {
            max_header_bytes,
            header_read_timeout: cx.positive_duration(
                &at("limits.header_read_timeout"),
                lim.header_read_timeout.as_ref(),
                Duration::from_secs(10),
            ),
            idle_timeout: cx.positive_duration(
                &at("limits.idle_timeout"),
                lim.idle_timeout.as_ref(),
                Duration::from_secs(60),
            ),
            max_connections: match lim.max_connections {
                None => 10_000,
                Some(0) => {
                    cx.bad(at("limits.max_connections"), "must be at least 1");
                    1
                }
                Some(n) => n.min(u32::MAX as u64) as usize,
            },
        };
        inbound.push(InboundConfig {
            name,
            listen,
            protocol: r.protocol.unwrap_or(Protocol::Http),
            target,
            limits,
            tls,
            request_timeout: cx.duration(
                &at("request_timeout"),
                r.request_timeout.as_ref(),
                Duration::from_secs(15),
            ),
            connect_timeout: cx.positive_duration(
                &at("connect_timeout"),
                r.connect_timeout.as_ref(),
                Duration::from_secs(1),
            ),
        });
    }

    if raw.outbound.is_some() {
        cx.bad("outbound", "outbound (ambassador) listeners are not in this build yet; remove `outbound`");
    }
    if raw.logship.is_some() {
        cx.bad("logship", "log shipping is not in this build yet; remove `logship`");
    }
    if raw.telemetry.tracing.is_some() {
        cx.bad("telemetry.tracing", "OTLP tracing is not in this build yet; remove `telemetry.tracing`");
    }

    let log_level = raw.telemetry.log_level.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
        cx.bad("telemetry.log_level", format!("`{log_level}` is not a log filter: {e}"));
    }
    let al = raw.telemetry.access_log;
    let access_format = al.format.unwrap_or(LogFormat::Json);
    if access_format != LogFormat::Json {
        cx.bad("telemetry.access_log.format", "only `json` is supported");
    }
    let path = match al.path.as_deref() {
        None | Some("stdout") | Some("-") => AccessLogPath::Stdout,
        Some("") => {
            cx.bad("telemetry.access_log.path", "empty: use `stdout` or a file path");
            AccessLogPath::Stdout
        }
        Some(p) => AccessLogPath::File(PathBuf::from(p)),
    };
    let telemetry = TelemetryConfig {
        log_level,
        log_format: raw.telemetry.log_format.unwrap_or(LogFormat::Text),
        access_log: AccessLogConfig { enabled: al.enabled.unwrap_or(true), format: access_format, path },
    };

    let shutdown = ShutdownConfig {
        drain_timeout: cx.duration(
            "shutdown.drain_timeout",
            raw.shutdown.drain_timeout.as_ref(),
            Duration::from_secs(20),
        ),
    };
    let worker_threads = raw.runtime.worker_threads.unwrap_or(0);
    if worker_threads > 1024 {
        cx.bad("runtime.worker_threads", format!("{worker_threads} is more than 1024"));
    }

    Config {
        admin,
        app,
        inbound,
        telemetry,
        shutdown,
        runtime: RuntimeConfig { worker_threads: worker_threads as usize },
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `127.0.0.1:8080`, `[::1]:8080`, or `localhost:8080` (resolved once, here).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("`{text}` is not an address: expected HOST:PORT, like `127.0.0.1:8080`"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("`{text}`: `{port}` is not a port number"));
    }
    if host != "localhost" {
        return Err(format!(
            "`{text}` is not an address: expected IP:PORT, like `127.0.0.1:8080` (names other than localhost are not resolved here)"
        ));
    }
    (host, port.parse::<u16>().unwrap_or(0))
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.find(|a| a.is_ipv4()))
        .ok_or_else(|| format!("`{text}`: localhost does not resolve"))
}

fn parse_duration(s: &Scalar) -> Result<Duration, String> {
    match s {
        Scalar::Int(0) => Ok(Duration::ZERO),
        Scalar::Int(n) => Err(format!("`{n}` has no unit: write a duration like `{n}s` or `{n}ms`")),
        Scalar::Str(t) => humantime::parse_duration(t.trim())
            .map_err(|e| format!("`{t}` is not a duration ({e}): write it like `250ms`, `5s` or `2m`")),
    }
}

/// `65536`, `64KiB`, `10MiB`, `1GiB`, `500KB`, `2MB`.
fn parse_size(s: &Scalar) -> Result<u64, String> {
    let t = match s {
        Scalar::Int(n) => return Ok(*n),
        Scalar::Str(t) => t.trim(),
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{t}` is not a size: write it like `64KiB`, `10MiB` or a number of bytes");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "KB" | "kB" | "K" | "k" => 1000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("sidecar.yaml"), text)
    }

    #[test]
    fn smallest_config_gets_safe_defaults() {
        let c = parse_str("inbound:\n  - { name: web, listen: 0.0.0.0:15006 }\n").unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.app.address, "127.0.0.1:8080".parse().unwrap());
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

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size(&Scalar::Str("64KiB".into())), Ok(65536));
        assert_eq!(parse_size(&Scalar::Str("10MiB".into())), Ok(10 << 20));
        assert_eq!(parse_size(&Scalar::Int(100)), Ok(100));
        assert!(parse_size(&Scalar::Str("KiB".into())).is_err());
        assert_eq!(parse_duration(&Scalar::Str("250ms".into())), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(&Scalar::Str("2m".into())), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn duplicate_names_and_addresses() {
        let err =
            parse_str("inbound:\n - {name: a, listen: 127.0.0.1:1}\n - {name: a, listen: 127.0.0.1:1}\n")
                .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
    }

    #[test]
    fn not_yet_built_sections_are_refused_not_ignored() {
        let err = parse_str("inbound: [{name: a, listen: 127.0.0.1:1, tls: {cert: x}}]\noutbound: []\n")
            .unwrap_err();
        let s = err.to_string();
        assert!(s.contains("inbound[0].tls"), "{s}");
        assert!(s.contains("outbound"), "{s}");
    }
}
