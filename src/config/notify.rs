//! The `notify` section: which mounted files (ConfigMap and Secret volumes) to watch, and how to
//! tell the app they changed: an HTTP request, a signal to its process, or both.
//!
//! Not responsible for watching or telling (`crate::k8s::notify`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Ctx, Scalar, duration_str};
use super::telemetry::Redacted;

/// Changes closer together than this make one notification. The kubelet's atomic writer swaps
/// `..data` and then adds and removes the user-visible links within milliseconds; a second
/// also joins an operator's `kubectl cp` of several files.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_secs(1);
/// configmap-reload's method.
pub const DEFAULT_METHOD: &str = "POST";
/// An app's reload endpoint answers once it has re-read its files; 5 s is generous for that
/// and short enough that a hung app is retried soon.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The first try and four retries: with `backoff: 1s` they span about 15 s, which covers an
/// app restarting (a crash loop's first restart is 10 s after the crash).
pub const DEFAULT_ATTEMPTS: u32 = 5;
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// More tries than this is a loop, not a retry policy.
pub const MAX_ATTEMPTS: u32 = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNotify {
    name: Option<String>,
    paths: Vec<String>,
    debounce: Option<Scalar>,
    http: Option<RawHttp>,
    signal: Option<RawSignal>,
    retry: RawRetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    url: Option<String>,
    method: Option<String>,
    timeout: Option<Scalar>,
    headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSignal {
    signal: Option<String>,
    process: Option<String>,
    pid_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    attempts: Option<u32>,
    backoff: Option<Scalar>,
    max_backoff: Option<Scalar>,
}

/// One watch: a group of paths and what to do when their content changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotifyConfig {
    /// The watch's name in metrics (`watch` label), logs and the request body.
    pub name: String,
    /// Absolute paths: files, or directories (a volume's mount point), whose files are watched
    /// with their subdirectories, leaving out the kubelet's own `..`-prefixed entries.
    pub paths: Vec<PathBuf>,
    /// A change is told once nothing more has changed for this long. Default 1s.
    #[serde(with = "duration_str")]
    pub debounce: Duration,
    pub http: Option<NotifyHttp>,
    pub signal: Option<NotifySignal>,
    pub retry: NotifyRetry,
}

/// The request that tells the app.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotifyHttp {
    /// An `http://` URL (the app is in the pod: no TLS).
    pub url: String,
    /// Default `POST`.
    pub method: String,
    /// One try's limit, connect to the end of the answer. Default 5s.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Sent with every request; values never shown.
    pub headers: Redacted,
}

/// The signal that tells the app, and which process gets it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotifySignal {
    /// Default `SIGHUP`.
    pub signal: SignalName,
    #[serde(flatten)]
    pub target: ProcessTarget,
}

/// How the app's process is found (the pod must share its process namespace).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessTarget {
    /// Every process whose `/proc/PID/comm`, or the file name of whose first command-line
    /// word, is this, except those whose parent is one too (nginx's workers, gunicorn's).
    Process(String),
    /// The PID written in this file.
    PidFile(PathBuf),
}

/// The signals an app may take as "re-read your config".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalName {
    Hup,
    Usr1,
    Usr2,
    Int,
    Quit,
    Term,
    Winch,
}

/// Tries per change and the waits between them (exponential, jittered, capped).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotifyRetry {
    /// Tries in all, the first included; 1 turns retries off. Default 5.
    pub attempts: u32,
    /// The wait after the first failure, doubled after each further one. Default 1s.
    #[serde(with = "duration_str")]
    pub backoff: Duration,
    /// The longest wait. Default 30s.
    #[serde(with = "duration_str")]
    pub max_backoff: Duration,
}

impl SignalName {
    const ALL: [SignalName; 7] = [
        SignalName::Hup,
        SignalName::Usr1,
        SignalName::Usr2,
        SignalName::Int,
        SignalName::Quit,
        SignalName::Term,
        SignalName::Winch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignalName::Hup => "SIGHUP",
            SignalName::Usr1 => "SIGUSR1",
            SignalName::Usr2 => "SIGUSR2",
            SignalName::Int => "SIGINT",
            SignalName::Quit => "SIGQUIT",
            SignalName::Term => "SIGTERM",
            SignalName::Winch => "SIGWINCH",
        }
    }

    /// `SIGHUP`, `HUP`, `sighup` or `hup`.
    pub fn parse(text: &str) -> Option<SignalName> {
        let upper = text.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        SignalName::ALL.into_iter().find(|s| &s.as_str()[3..] == bare)
    }
}

impl Serialize for SignalName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

pub(super) fn validate(raw: Vec<RawNotify>, cx: &mut Ctx) -> Vec<NotifyConfig> {
    let watches: Vec<NotifyConfig> =
        raw.into_iter().enumerate().map(|(i, w)| validate_watch(w, i, cx)).collect();
    let mut seen = std::collections::HashSet::new();
    for (i, w) in watches.iter().enumerate() {
        if !w.name.is_empty() && !seen.insert(w.name.as_str()) {
            cx.bad(format!("notify[{i}].name"), format!("`{}` is used twice", w.name));
        }
    }
    watches
}

fn validate_watch(raw: RawNotify, i: usize, cx: &mut Ctx) -> NotifyConfig {
    let at = format!("notify[{i}]");
    let name = cx.name(&at, raw.name, "missing: a name for metrics and logs, like `app-config`");
    if raw.paths.is_empty() {
        cx.bad(
            format!("{at}.paths"),
            "missing: the directories (a ConfigMap or Secret volume's mountPath) or files to watch",
        );
    }
    for (j, p) in raw.paths.iter().enumerate() {
        if !p.starts_with('/') {
            cx.bad(format!("{at}.paths[{j}]"), format!("`{p}` is not an absolute path"));
        }
    }
    if raw.http.is_none() && raw.signal.is_none() {
        cx.bad(
            format!("{at}.http"),
            "missing: a watch needs `http` (a request to the app), `signal` (a signal to its process) or both",
        );
    }
    let http = raw.http.map(|h| validate_http(h, &at, cx));
    let signal = raw.signal.map(|s| validate_signal(s, &at, cx));
    let attempts = match raw.retry.attempts {
        None => DEFAULT_ATTEMPTS,
        Some(0) => {
            cx.bad(format!("{at}.retry.attempts"), "must be at least 1 (the first try); 1 turns retries off");
            DEFAULT_ATTEMPTS
        }
        Some(n) if n > MAX_ATTEMPTS => {
            cx.bad(format!("{at}.retry.attempts"), format!("{n} is more than {MAX_ATTEMPTS} tries"));
            n
        }
        Some(n) => n,
    };
    let backoff =
        cx.positive_duration(&format!("{at}.retry.backoff"), raw.retry.backoff.as_ref(), DEFAULT_BACKOFF);
    let max_backoff = cx.positive_duration(
        &format!("{at}.retry.max_backoff"),
        raw.retry.max_backoff.as_ref(),
        DEFAULT_MAX_BACKOFF.max(backoff),
    );
    if max_backoff < backoff {
        cx.bad(format!("{at}.retry.max_backoff"), "is shorter than `backoff`");
    }
    NotifyConfig {
        name,
        paths: raw.paths.into_iter().map(PathBuf::from).collect(),
        debounce: cx.positive_duration(&format!("{at}.debounce"), raw.debounce.as_ref(), DEFAULT_DEBOUNCE),
        http,
        signal,
        retry: NotifyRetry { attempts, backoff, max_backoff },
    }
}

fn validate_http(raw: RawHttp, at: &str, cx: &mut Ctx) -> NotifyHttp {
    let url = raw.url.unwrap_or_default();
    match url.parse::<http::Uri>() {
        _ if url.is_empty() => {
            cx.bad(format!("{at}.http.url"), "missing: the app's reload URL, like http://127.0.0.1:8080/-/reload")
        }
        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some_and(|h| !h.is_empty()) => {}
        Ok(u) if u.scheme_str() == Some("https") => cx.bad(
            format!("{at}.http.url"),
            format!("`{url}`: https is not supported; the app is in the pod, so call it over http://127.0.0.1:PORT"),
        ),
        _ => cx.bad(format!("{at}.http.url"), format!("`{url}` is not an http:// URL")),
    }
    let method = raw.method.unwrap_or_else(|| DEFAULT_METHOD.to_owned());
    if method.is_empty() || http::Method::from_bytes(method.as_bytes()).is_err() {
        cx.bad(format!("{at}.http.method"), format!("`{method}` is not an HTTP method"));
    }
    for (header, value) in &raw.headers {
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            cx.bad(format!("{at}.http.headers.{header}"), "not a header name");
        }
        // The value is not shown: headers carry tokens.
        if http::HeaderValue::from_str(value).is_err() {
            cx.bad(
                format!("{at}.http.headers.{header}"),
                "the value is not a valid header value (a control character or a line break?)",
            );
        }
    }
    NotifyHttp {
        url,
        method,
        timeout: cx.positive_duration(
            &format!("{at}.http.timeout"),
            raw.timeout.as_ref(),
            DEFAULT_HTTP_TIMEOUT,
        ),
        headers: Redacted(raw.headers),
    }
}

fn validate_signal(raw: RawSignal, at: &str, cx: &mut Ctx) -> NotifySignal {
    let signal = match raw.signal.as_deref().map(|s| (s, SignalName::parse(s))) {
        None => SignalName::Hup,
        Some((_, Some(s))) => s,
        Some((text, None)) => {
            let known: Vec<&str> = SignalName::ALL.iter().map(|s| s.as_str()).collect();
            cx.bad(
                format!("{at}.signal.signal"),
                format!("`{text}` is not a signal this can send: one of {}", known.join(", ")),
            );
            SignalName::Hup
        }
    };
    let target = match (raw.process, raw.pid_file) {
        (Some(_), Some(_)) => {
            cx.bad(format!("{at}.signal.pid_file"), "set together with `process`: give one of them");
            ProcessTarget::Process(String::new())
        }
        (None, None) => {
            cx.bad(
                format!("{at}.signal.process"),
                "missing: the app's process name (as in /proc/PID/comm) or `pid_file`",
            );
            ProcessTarget::Process(String::new())
        }
        (Some(p), None) => {
            if p.is_empty() || p.contains('/') || p.contains('\0') {
                cx.bad(
                    format!("{at}.signal.process"),
                    format!("`{p}` is not a process name: the executable's file name, like `nginx`"),
                );
            }
            ProcessTarget::Process(p)
        }
        (None, Some(f)) => {
            if !f.starts_with('/') {
                cx.bad(format!("{at}.signal.pid_file"), format!("`{f}` is not an absolute path"));
            }
            ProcessTarget::PidFile(PathBuf::from(f))
        }
    };
    NotifySignal { signal, target }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Problem;
    use crate::config::tests::parse_str;

    const OK: &str = "notify:
  - name: app-config
    paths: [/etc/app/config, /etc/app/secret/token]
    http: { url: \"http://127.0.0.1:8080/-/reload\", headers: { Authorization: \"Bearer s3cret\" } }
  - name: nginx
    paths: [/etc/nginx/conf.d]
    debounce: 250ms
    signal: { process: nginx }
    retry: { attempts: 3, backoff: 100ms, max_backoff: 1s }
  - { name: pid, paths: [/etc/x], signal: { signal: usr2, pid_file: /run/app.pid } }
";

    #[test]
    fn a_notify_only_config_runs_with_defaults_and_hides_header_values() {
        let c = parse_str(OK).expect("valid");
        assert!(c.inbound.is_empty() && c.outbound.is_empty() && c.logship.is_none());
        let [a, b, p] = &c.notify[..] else { panic!("three watches: {:?}", c.notify) };
        assert_eq!(a.debounce, Duration::from_secs(1));
        assert_eq!(
            a.retry,
            NotifyRetry {
                attempts: 5,
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(30)
            }
        );
        let h = a.http.as_ref().unwrap();
        assert_eq!((h.method.as_str(), h.timeout), ("POST", Duration::from_secs(5)));
        assert!(a.signal.is_none());
        assert_eq!(b.debounce, Duration::from_millis(250));
        assert_eq!(
            b.signal,
            Some(NotifySignal { signal: SignalName::Hup, target: ProcessTarget::Process("nginx".into()) })
        );
        assert_eq!(b.retry.attempts, 3);
        assert_eq!(
            p.signal,
            Some(NotifySignal {
                signal: SignalName::Usr2,
                target: ProcessTarget::PidFile("/run/app.pid".into())
            })
        );
        let shown = serde_yaml_ng::to_string(&c).unwrap();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("signal: SIGUSR2\n    pid_file: /run/app.pid"), "{shown}");
        assert!(shown.contains("debounce: 250ms"), "{shown}");
    }

    #[test]
    fn every_bad_notify_field_is_named() {
        let text = "inbound: [{ name: web, listen: 127.0.0.1:15006 }]
notify:
  - name: a
    paths: [etc/app, /ok]
    http: { url: \"ftp://x/reload\", method: \"NOT A METHOD\", timeout: 0s, headers: { \"bad header\": v } }
    signal: { signal: SIGNOPE, process: bin/app }
    retry: { attempts: 0, backoff: 2s, max_backoff: 1s }
  - { name: a, paths: [/x], debounce: soon }
  - { name: \"b c\", signal: { pid_file: run/app.pid } }
  - { name: d, paths: [/x], http: { url: \"https://127.0.0.1:8443/\" }, signal: { process: app, pid_file: /run/a.pid } }
  - { name: e, paths: [/x], signal: {} }
  - { paths: [/x], http: {} }
";
        let problems = parse_str(text).unwrap_err().problems;
        let want = [
            ("notify[0].paths[0]", "`etc/app` is not an absolute path"),
            ("notify[0].http.url", "`ftp://x/reload` is not an http:// URL"),
            ("notify[0].http.method", "`NOT A METHOD` is not an HTTP method"),
            ("notify[0].http.headers.bad header", "not a header name"),
            ("notify[0].http.timeout", "must be longer than 0s"),
            (
                "notify[0].signal.signal",
                "`SIGNOPE` is not a signal this can send: one of SIGHUP, SIGUSR1, SIGUSR2, SIGINT, SIGQUIT, SIGTERM, SIGWINCH",
            ),
            (
                "notify[0].signal.process",
                "`bin/app` is not a process name: the executable's file name, like `nginx`",
            ),
            ("notify[0].retry.attempts", "must be at least 1 (the first try); 1 turns retries off"),
            ("notify[0].retry.max_backoff", "is shorter than `backoff`"),
            (
                "notify[1].http",
                "missing: a watch needs `http` (a request to the app), `signal` (a signal to its process) or both",
            ),
            (
                "notify[1].debounce",
                "`soon` is not a duration (expected number at 0): write it like `250ms`, `5s` or `2m`",
            ),
            ("notify[2].name", "`b c` is not a name: letters, digits, `-`, `_` and `.` only"),
            (
                "notify[2].paths",
                "missing: the directories (a ConfigMap or Secret volume's mountPath) or files to watch",
            ),
            ("notify[2].signal.pid_file", "`run/app.pid` is not an absolute path"),
            (
                "notify[3].http.url",
                "`https://127.0.0.1:8443/`: https is not supported; the app is in the pod, so call it over http://127.0.0.1:PORT",
            ),
            ("notify[3].signal.pid_file", "set together with `process`: give one of them"),
            (
                "notify[4].signal.process",
                "missing: the app's process name (as in /proc/PID/comm) or `pid_file`",
            ),
            ("notify[5].name", "missing: a name for metrics and logs, like `app-config`"),
            ("notify[5].http.url", "missing: the app's reload URL, like http://127.0.0.1:8080/-/reload"),
            ("notify[1].name", "`a` is used twice"),
        ];
        for (path, message) in want {
            let p = Problem { path: path.to_owned(), message: message.to_owned() };
            assert!(problems.contains(&p), "missing {p:?} in:\n{problems:#?}");
        }
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
    }

    #[test]
    fn signal_names_are_read_with_or_without_sig_in_any_case() {
        for text in ["SIGHUP", "HUP", "sighup", "hup", " SIGHUP "] {
            assert_eq!(SignalName::parse(text), Some(SignalName::Hup), "{text}");
        }
        assert_eq!(SignalName::parse("USR1"), Some(SignalName::Usr1));
        for text in ["", "SIG", "KILL", "SIGKILL", "9", "SIGHUPX"] {
            assert_eq!(SignalName::parse(text), None, "{text}");
        }
    }
}
