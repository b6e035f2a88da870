//! Config-change notifications (the "configuration sidecar"): the files of a mounted ConfigMap
//! or Secret are watched by content, and when they change the app is told, by an HTTP request,
//! a signal to its process, or both, with retries.
//!
//! Watching is the file watcher's (`crate::files`, a tree group per watch: the kubelet's
//! `..data` swap is seen as the files the app reads changing, once). Telling runs on a thread
//! of its own, `sidecar-notify`, with a small runtime: its requests, its `/proc` scans and its
//! retries' sleeps never take a proxy worker. It follows the running config (each reload's
//! `notify`) and ends at the drain. Not responsible for the sidecar's own config reload
//! (`app::reload`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::config::notify::{NotifyConfig, NotifyHttp, NotifyRetry, NotifySignal, ProcessTarget, SignalName};
use crate::drain::DrainWatch;
use crate::files::{FileState, FileWatcher, Snapshot, Watch};

/// How often a new watch first looks for its first poll's result (the state changes are
/// measured from). The file watcher reads a new group at once, so this is a few milliseconds;
/// the wait doubles up to [`BASELINE_POLL_MAX`] while the watcher is stuck on a hung volume.
const BASELINE_POLL: Duration = Duration::from_millis(10);
const BASELINE_POLL_MAX: Duration = Duration::from_secs(1);

/// An app's answer is read for its status only; more than this of body is not read.
const MAX_ANSWER: usize = 64 << 10;

/// `/proc/PID/comm` holds at most 15 bytes (TASK_COMM_LEN less its NUL): a longer
/// executable name is seen there cut to this.
const COMM_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
#[error("starting the sidecar-notify thread: {0}")]
pub struct NotifyError(#[from] std::io::Error);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabel {
    watch: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    watch: String,
    result: &'static str,
}

/// `sidecar_notify_*`: registered once at start, a watch's series made when it starts and
/// removed when a reload removes it.
#[derive(Clone, Default)]
pub struct Metrics {
    total: Family<ResultLabels, Counter>,
    retries: Family<WatchLabel, Counter>,
    last_success: Family<WatchLabel, Gauge>,
}

/// One watch's series.
struct WatchMetrics {
    success: Counter,
    error: Counter,
    retries: Counter,
    /// Its series is made at the first success: a timestamp of 0 would read as "told, decades
    /// ago" rather than "never told".
    last_success: Family<WatchLabel, Gauge>,
    label: WatchLabel,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "notify",
            "Config-change notifications to the app, by watch and result (error: every try failed)",
            m.total.clone(),
        );
        registry.register("notify_retries", "Tries after a notification's first one", m.retries.clone());
        registry.register(
            "notify_last_success_timestamp_seconds",
            "When the app was last told of a change (Unix time); absent until the first success",
            m.last_success.clone(),
        );
        m
    }

    fn watch(&self, name: &str) -> WatchMetrics {
        let label = |result| ResultLabels { watch: name.to_owned(), result };
        // One statement each: `get_or_create` returns a read guard, and a second call in the
        // same expression would wait for ever to write.
        let success = self.total.get_or_create(&label("success")).clone();
        let error = self.total.get_or_create(&label("error")).clone();
        let label = WatchLabel { watch: name.to_owned() };
        let retries = self.retries.get_or_create(&label).clone();
        WatchMetrics { success, error, retries, last_success: self.last_success.clone(), label }
    }

    fn remove(&self, name: &str) {
        for result in ["success", "error"] {
            self.total.remove(&ResultLabels { watch: name.to_owned(), result });
        }
        let w = WatchLabel { watch: name.to_owned() };
        self.retries.remove(&w);
        self.last_success.remove(&w);
    }
}

/// Starts the `sidecar-notify` thread. It runs the watches `config` names (and each reload's,
/// as they come) until the drain begins or the config channel closes.
pub fn start(
    config: watch::Receiver<Arc<Config>>,
    files: FileWatcher,
    metrics: Metrics,
    drain: DrainWatch,
) -> Result<(), NotifyError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new()
        .name("sidecar-notify".into())
        .spawn(move || runtime.block_on(supervise(config, files, metrics, drain)))?;
    Ok(())
}

/// A running watch.
struct Running {
    config: NotifyConfig,
    /// What the task tells and how: swapped in place when only that changes.
    tx: watch::Sender<Arc<NotifyConfig>>,
    task: JoinHandle<()>,
}

async fn supervise(
    mut config: watch::Receiver<Arc<Config>>,
    files: FileWatcher,
    metrics: Metrics,
    mut drain: DrainWatch,
) {
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        let wanted = config.borrow_and_update().notify.clone();
        apply(&mut running, wanted, &files, &metrics);
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = drain.signaled() => break,
        }
    }
    // A notification in flight is dropped: the pod is stopping, the app with it.
    for (_, r) in running {
        r.task.abort();
    }
}

/// Makes the running watches what `wanted` asks for. A watch whose paths and debounce are
/// unchanged keeps its file watch (and so what it last saw): only how it tells changes.
fn apply(
    running: &mut HashMap<String, Running>,
    wanted: Vec<NotifyConfig>,
    files: &FileWatcher,
    metrics: &Metrics,
) {
    running.retain(|name, r| {
        let keep = wanted.iter().any(|w| w.name == *name);
        if !keep {
            r.task.abort();
            metrics.remove(name);
            tracing::info!(watch = %name, "config-change watch removed");
        }
        keep
    });
    for cfg in wanted {
        match running.get_mut(&cfg.name) {
            Some(r) if r.config == cfg => {}
            Some(r) if r.config.paths == cfg.paths && r.config.debounce == cfg.debounce => {
                r.tx.send_replace(Arc::new(cfg.clone()));
                r.config = cfg;
                tracing::info!(watch = %r.config.name, "config-change watch updated");
            }
            _ => {
                if let Some(old) = running.remove(&cfg.name) {
                    old.task.abort();
                }
                let watch = files.watch_tree(cfg.paths.clone(), cfg.debounce);
                let (tx, rx) = watch::channel(Arc::new(cfg.clone()));
                let task = tokio::spawn(run_watch(watch, rx, metrics.watch(&cfg.name)));
                tracing::info!(watch = %cfg.name, paths = ?cfg.paths, "watching for config changes");
                running.insert(cfg.name.clone(), Running { config: cfg, tx, task });
            }
        }
    }
}

/// One watch's life: take the baseline, then tell the app of each settled change. Changes that
/// come while the app is being told collapse into the latest (the watch keeps only that), so
/// a slow app is told again once, of where the files are now.
async fn run_watch(mut watch: Watch, cfg: watch::Receiver<Arc<NotifyConfig>>, metrics: WatchMetrics) {
    let mut wait = BASELINE_POLL;
    let mut told = loop {
        if let Some(s) = watch.current() {
            break s;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(BASELINE_POLL_MAX);
    };
    while let Some(now) = watch.changed().await {
        let changed = changed_files(&told, &now);
        told = now;
        if changed.is_empty() {
            // Back to what the app was last told of before it could be told of the change.
            continue;
        }
        let cfg = cfg.borrow().clone();
        notify(&cfg, &changed, &metrics).await;
    }
}

/// The files whose state differs between two snapshots: changed, added or removed, by path.
pub fn changed_files(before: &Snapshot, after: &Snapshot) -> Vec<PathBuf> {
    let old: HashMap<&Path, FileState> = before.files.iter().map(|(p, s)| (p.as_path(), *s)).collect();
    let new: HashMap<&Path, FileState> = after.files.iter().map(|(p, s)| (p.as_path(), *s)).collect();
    let mut out: Vec<PathBuf> = new
        .iter()
        .filter(|(p, s)| old.get(*p) != Some(s))
        .map(|(p, _)| p.to_path_buf())
        .chain(old.keys().filter(|p| !new.contains_key(*p)).map(|p| p.to_path_buf()))
        .collect();
    out.sort();
    out
}

/// Tells the app by every means configured, each with its own retries (a signal is not sent
/// again because the request failed), and counts the result.
async fn notify(cfg: &NotifyConfig, changed: &[PathBuf], m: &WatchMetrics) {
    let body = request_body(&cfg.name, changed);
    let http = async {
        match &cfg.http {
            Some(h) => {
                Some(retrying(&cfg.retry, &m.retries, &cfg.name, "http", || send_http(h, &body)).await)
            }
            None => None,
        }
    };
    let signal = async {
        match &cfg.signal {
            Some(s) => {
                Some(retrying(&cfg.retry, &m.retries, &cfg.name, "signal", || async { send_signal(s) }).await)
            }
            None => None,
        }
    };
    let (http, signal) = tokio::join!(http, signal);
    let results = [http, signal];
    let failed: Vec<&String> = results.iter().flatten().filter_map(|r| r.as_ref().err()).collect();
    let done: Vec<&String> = results.iter().flatten().filter_map(|r| r.as_ref().ok()).collect();
    if failed.is_empty() {
        m.success.inc();
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        m.last_success.get_or_create(&m.label).set(i64::try_from(now).unwrap_or(i64::MAX));
        tracing::info!(watch = %cfg.name, changed = ?changed, told = ?done, "the app was told of a config change");
    } else {
        m.error.inc();
        tracing::error!(watch = %cfg.name, changed = ?changed, errors = ?failed, told = ?done, attempts = cfg.retry.attempts, "the app could not be told of a config change");
    }
}

/// `{"watch":"app-config","changed":["/etc/app/config/app.yaml"]}`: what the request carries.
pub fn request_body(watch: &str, changed: &[PathBuf]) -> Bytes {
    let changed: Vec<String> = changed.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    Bytes::from(serde_json::json!({ "watch": watch, "changed": changed }).to_string())
}

/// One try's outcome. Whether a failure is worth another try is decided where it happens.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Told; what was done, for the log.
    Done(String),
    /// Failed in a way a later try may not (refused, 5xx, timeout, no such process yet).
    Retry(String),
    /// Failed in a way another try would repeat (a 4xx, permission denied).
    Fail(String),
}

/// Runs `attempt` up to `retry.attempts` times while it asks to be retried, waiting
/// [`backoff_delay`] between tries. `Ok` says what was done, `Err` the last failure.
async fn retrying<F, Fut>(
    retry: &NotifyRetry,
    retries: &Counter,
    watch: &str,
    how: &'static str,
    mut attempt: F,
) -> Result<String, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Outcome::Done(what) => return Ok(what),
            Outcome::Fail(why) => return Err(format!("{how}: {why}")),
            Outcome::Retry(why) if tries >= retry.attempts => {
                return Err(format!("{how}: {why} (after {tries} tries)"));
            }
            Outcome::Retry(why) => {
                let wait = backoff_delay(retry, tries, rand::rng().random::<f64>());
                tracing::warn!(watch, how, reason = %why, tries, retry_in = ?wait, "telling the app failed; will retry");
                retries.inc();
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The wait after the `failures`-th failed try: `backoff` doubled for each failure before it,
/// capped at `max_backoff`, then jittered into its upper half by `unit` (0..1), so sidecars
/// told of the same ConfigMap at once do not retry their apps in step.
pub fn backoff_delay(retry: &NotifyRetry, failures: u32, unit: f64) -> Duration {
    let cap = retry.backoff.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(retry.max_backoff);
    let lo = cap / 2;
    lo + (cap - lo).mul_f64(unit.clamp(0.0, 1.0))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// One request to the app, bounded by `timeout` from connect to the end of the answer.
async fn send_http(h: &NotifyHttp, body: &Bytes) -> Outcome {
    match tokio::time::timeout(h.timeout, exchange(h, body.clone())).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Retry(format!(
            "no answer from {} within {}",
            h.url,
            humantime::format_duration(h.timeout)
        )),
    }
}

async fn exchange(h: &NotifyHttp, body: Bytes) -> Outcome {
    // Validated with the config: an http:// URL with a host.
    let Ok(uri) = h.url.parse::<http::Uri>() else {
        return Outcome::Fail(format!("`{}` is not a URL", h.url));
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri.authority().map_or_else(String::new, |a| a.as_str().to_owned());
    let tcp = match tokio::net::TcpStream::connect((host.as_str(), port)).await {
        Ok(t) => t,
        Err(e) => {
            return Outcome::Retry(format!("cannot connect to {authority}: {e}; is the app listening?"));
        }
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(pair) => pair,
        Err(e) => return Outcome::Retry(format!("HTTP handshake with {authority} failed: {e}")),
    };
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let method = http::Method::from_bytes(h.method.as_bytes()).unwrap_or(http::Method::POST);
    // A GET or HEAD with a body is refused by some servers; the body only repeats what the
    // method's target already says for those.
    let body = if matches!(method, http::Method::GET | http::Method::HEAD) { Bytes::new() } else { body };
    let mut req = http::Request::new(Full::new(body.clone()));
    *req.method_mut() = method;
    *req.uri_mut() = uri.path_and_query().map_or("/", |p| p.as_str()).parse().unwrap_or_default();
    let headers = req.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(&authority) {
        headers.insert(http::header::HOST, v);
    }
    headers.insert(http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT));
    if !body.is_empty() {
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    }
    for (k, v) in &h.headers.0 {
        // Validated with the config.
        if let (Ok(name), Ok(mut value)) =
            (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v))
        {
            value.set_sensitive(true);
            headers.insert(name, value);
        }
    }
    let outcome = match sender.send_request(req).await {
        Err(e) => Outcome::Retry(format!("request to {authority} failed: {e}")),
        Ok(resp) => {
            let status = resp.status();
            // Read (some of) the answer so the app sees its response taken, then close.
            let _ = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
            judge(status, &h.url)
        }
    };
    conn.abort();
    outcome
}

const USER_AGENT: &str = concat!("sidecar/", env!("CARGO_PKG_VERSION"));

/// An answer's verdict: 2xx told; 408, 429 and 5xx retried (the app is starting, busy or
/// restarting); anything else is the app saying no, which a retry would hear again.
pub fn judge(status: http::StatusCode, url: &str) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Done(format!("{url} answered {code}"))
    } else if status.is_server_error() || code == 408 || code == 429 {
        Outcome::Retry(format!("{url} answered {code}"))
    } else {
        Outcome::Fail(format!("{url} answered {code}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// Finds the app's process(es) and signals them. Not finding one is retried: the app may be
/// restarting, or not started yet.
fn send_signal(s: &NotifySignal) -> Outcome {
    let pids = match &s.target {
        ProcessTarget::PidFile(file) => match read_pid_file(file) {
            Ok(pid) => vec![pid],
            Err(why) => return Outcome::Retry(why),
        },
        ProcessTarget::Process(name) => {
            let pids = find_processes(Path::new("/proc"), name, std::process::id());
            if pids.is_empty() {
                return Outcome::Retry(format!(
                    "no process named `{name}` in /proc; does the pod share its process namespace (shareProcessNamespace: true)?"
                ));
            }
            pids
        }
    };
    let sig = rustix_signal(s.signal);
    let mut sent = Vec::new();
    for pid in pids {
        let Some(target) = rustix::process::Pid::from_raw(pid) else { continue };
        match rustix::process::kill_process(target, sig) {
            Ok(()) => sent.push(pid),
            Err(rustix::io::Errno::SRCH) => {
                return Outcome::Retry(format!("process {pid} has gone"));
            }
            Err(rustix::io::Errno::PERM) => {
                return Outcome::Fail(format!(
                    "not permitted to signal process {pid}: run the sidecar as the app's user (runAsUser) or give it CAP_KILL"
                ));
            }
            Err(e) => return Outcome::Fail(format!("signalling process {pid}: {e}")),
        }
    }
    if sent.is_empty() {
        return Outcome::Retry("no process to signal".to_owned());
    }
    Outcome::Done(format!("{} sent to {sent:?}", s.signal.as_str()))
}

fn rustix_signal(s: SignalName) -> rustix::process::Signal {
    use rustix::process::Signal;
    match s {
        SignalName::Hup => Signal::HUP,
        SignalName::Usr1 => Signal::USR1,
        SignalName::Usr2 => Signal::USR2,
        SignalName::Int => Signal::INT,
        SignalName::Quit => Signal::QUIT,
        SignalName::Term => Signal::TERM,
        SignalName::Winch => Signal::WINCH,
    }
}

fn read_pid_file(file: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("pid file {}: {e}", file.display()))?;
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 1 => Ok(pid),
        _ => Err(format!("pid file {}: `{}` is not a process id", file.display(), text.trim())),
    }
}

/// The processes under `proc` (a `/proc`) called `name`: by `comm` (cut to 15 bytes as the
/// kernel cuts it) or by the file name of the first command-line word. Of a process tree that
/// all has the name (nginx's master and workers, gunicorn's arbiter and workers) only the
/// topmost are given: the one that reloads the rest. Zombies and `me` are left out.
pub fn find_processes(proc: &Path, name: &str, me: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc) else { return Vec::new() };
    let short = &name.as_bytes()[..name.len().min(COMM_LEN)];
    let mut found: Vec<(i32, i32)> = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid as u32 == me {
            continue;
        }
        let dir = entry.path();
        // Each read may fail as the process exits: it is then not there.
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else { continue };
        let Some((state, ppid)) = parse_stat(&stat) else { continue };
        if state == 'Z' {
            continue;
        }
        let comm = std::fs::read(dir.join("comm")).unwrap_or_default();
        let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let base = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
        let by_comm = comm == name.as_bytes() || (name.len() > COMM_LEN && comm == short);
        if by_comm || base == name.as_bytes() {
            found.push((pid, ppid));
        }
    }
    let pids: Vec<i32> = found.iter().map(|(p, _)| *p).collect();
    let mut top: Vec<i32> = found.iter().filter(|(_, ppid)| !pids.contains(ppid)).map(|(p, _)| *p).collect();
    top.sort_unstable();
    top
}

/// `PID (comm) S PPID …` → (state, ppid). The name may hold spaces and parentheses, so the
/// fields are read after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests;
