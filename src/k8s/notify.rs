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
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::time::Instant;

    use super::*;
    use crate::config::Problem;

    use crate::testing::TempDir;

    /// What the kubelet's atomic writer (pkg/volume/util/atomic_writer.go) does to a volume:
    /// the new content in a new timestamped directory, a `..data_tmp` link to it renamed over
    /// `..data`, then the user-visible links for new keys made and those of removed keys
    /// deleted, then the old directory removed. `pause` goes between the steps, as a busy
    /// node's would.
    fn kubelet_update(vol: &Path, generation: u32, files: &[(&str, &str)], pause: Duration) {
        let ts = format!("..2026_12_03_08_00_{generation:02}.{}", 100 + generation);
        std::fs::create_dir(vol.join(&ts)).unwrap();
        for (k, v) in files {
            std::fs::write(vol.join(&ts).join(k), v).unwrap();
        }
        let old = std::fs::read_link(vol.join("..data")).ok();
        std::os::unix::fs::symlink(&ts, vol.join("..data_tmp")).unwrap();
        std::thread::sleep(pause);
        std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
        std::thread::sleep(pause);
        for (k, _) in files {
            let _ = std::os::unix::fs::symlink(format!("..data/{k}"), vol.join(k));
        }
        for entry in std::fs::read_dir(vol).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !files.iter().any(|(k, _)| *k == name) {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        std::thread::sleep(pause);
        if let Some(old) = old {
            std::fs::remove_dir_all(vol.join(old)).unwrap();
        }
    }

    fn retry(attempts: u32) -> NotifyRetry {
        NotifyRetry { attempts, backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(40) }
    }

    /// A watch on `vol` whose only way to tell is a request to `port`.
    fn watch_config(vol: &Path, port: u16, debounce: Duration) -> NotifyConfig {
        NotifyConfig {
            name: "app-config".into(),
            paths: vec![vol.to_owned()],
            debounce,
            http: Some(NotifyHttp {
                url: format!("http://127.0.0.1:{port}/-/reload"),
                method: "POST".into(),
                timeout: Duration::from_secs(2),
                headers: Default::default(),
            }),
            signal: None,
            retry: retry(3),
        }
    }

    /// A tiny HTTP app on a thread: answers each request with the next status of `statuses`
    /// (then 200) and hands the request's text over `seen`.
    fn app(statuses: Vec<u16>) -> (u16, std::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut statuses = statuses.into_iter();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Head, then as much body as Content-Length says.
                loop {
                    let n = conn.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned)
                            })
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let status = statuses.next().unwrap_or(200);
                let _ = write!(conn, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                if tx.send(String::from_utf8_lossy(&req).into_owned()).is_err() {
                    return;
                }
            }
        });
        (port, rx)
    }

    fn metrics() -> (Metrics, Registry) {
        let mut r = crate::telemetry::metrics::registry();
        (Metrics::register(&mut r), r)
    }

    fn exposition(r: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap();
        out
    }

    /// Polls the file watcher fast, so a test's debounce is what it waits for.
    const POLL: Duration = Duration::from_millis(20);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kubelet_update_is_one_notification_and_a_rewrite_of_the_same_content_none() {
        let dir = TempDir::new("notify-kubelet");
        let vol = dir.path("config");
        std::fs::create_dir(&vol).unwrap();
        kubelet_update(&vol, 1, &[("app.yaml", "a: 1\n"), ("old.yaml", "x")], Duration::ZERO);
        let (port, seen) = app(vec![]);
        let files = FileWatcher::start(POLL).unwrap();
        let (m, registry) = metrics();
        let debounce = Duration::from_millis(300);
        let cfg = Arc::new(Config { notify: vec![watch_config(&vol, port, debounce)], ..smallest() });
        let (cfg_tx, cfg_rx) = watch::channel(cfg);
        let (drain, drain_watch) = crate::drain::Drain::new();
        start(cfg_rx, files.clone(), m, drain_watch).unwrap();
        // The baseline is taken at once; then a slow kubelet (100 ms between its steps, the
        // dangling links of removed keys seen by polls in between) changes one key, adds one
        // and removes one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let vol2 = vol.clone();
        tokio::task::spawn_blocking(move || {
            kubelet_update(&vol2, 2, &[("app.yaml", "a: 2\n"), ("new.yaml", "n")], Duration::from_millis(100))
        })
        .await
        .unwrap();
        let req = seen.recv_timeout(Duration::from_secs(5)).expect("one request");
        assert!(req.starts_with("POST /-/reload HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("content-type: application/json\r\n"), "{req}");
        let body: serde_json::Value =
            serde_json::from_str(&req[req.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        let p = |f: &str| vol.join(f).to_string_lossy().into_owned();
        assert_eq!(
            body,
            serde_json::json!({ "watch": "app-config", "changed": [p("app.yaml"), p("new.yaml"), p("old.yaml")] })
        );
        assert!(seen.recv_timeout(debounce * 3).is_err(), "a second notification for one update");

        // The same content again, as a new generation: new directory, new `..data`, new inodes.
        tokio::task::spawn_blocking(move || {
            kubelet_update(&vol, 3, &[("app.yaml", "a: 2\n"), ("new.yaml", "n")], Duration::from_millis(50))
        })
        .await
        .unwrap();
        assert!(seen.recv_timeout(debounce * 3).is_err(), "notified of a rewrite that changed nothing");
        let shown = exposition(&registry);
        assert!(
            shown.contains("sidecar_notify_total{watch=\"app-config\",result=\"success\"} 1\n"),
            "{shown}"
        );
        assert!(shown.contains("sidecar_notify_total{watch=\"app-config\",result=\"error\"} 0\n"), "{shown}");
        assert!(
            shown.contains("sidecar_notify_last_success_timestamp_seconds{watch=\"app-config\"} 1"),
            "{shown}"
        );

        // Removed by a reload: its series go with it.
        cfg_tx.send_replace(Arc::new(Config { notify: vec![], ..smallest() }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!exposition(&registry).contains("app-config"));
        drain.start();
        assert!(drain.wait(Duration::from_secs(2)).await, "the notify thread kept its drain handle");
    }

    #[tokio::test]
    async fn a_failing_app_is_retried_until_it_answers_and_a_4xx_is_not_retried() {
        let (m, registry) = metrics();
        let wm = m.watch("w");
        let mut cfg = watch_config(Path::new("/x"), 0, Duration::from_secs(1));
        cfg.name = "w".into();
        let (port, seen) = app(vec![503, 503, 200, 404]);
        cfg.http.as_mut().unwrap().url = format!("http://127.0.0.1:{port}/reload");
        cfg.retry = retry(5);
        notify(&cfg, &[PathBuf::from("/x/a")], &wm).await;
        assert_eq!(seen.try_iter().count(), 3);
        notify(&cfg, &[PathBuf::from("/x/a")], &wm).await;
        assert_eq!(seen.try_iter().count(), 1, "a 404 is the app's answer, not retried");
        let shown = exposition(&registry);
        assert!(shown.contains("sidecar_notify_total{watch=\"w\",result=\"success\"} 1\n"), "{shown}");
        assert!(shown.contains("sidecar_notify_total{watch=\"w\",result=\"error\"} 1\n"), "{shown}");
        assert!(shown.contains("sidecar_notify_retries_total{watch=\"w\"} 2\n"), "{shown}");
    }

    #[tokio::test]
    async fn an_app_that_is_not_listening_is_tried_attempts_times() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (m, _registry) = metrics();
        let wm = m.watch("w");
        let cfg = watch_config(Path::new("/x"), port, Duration::from_secs(1));
        let t = Instant::now();
        notify(&cfg, &[], &wm).await;
        assert_eq!(wm.retries.get(), 2);
        assert_eq!(wm.error.get(), 1);
        // Two waits of 5–10 ms then 10–20 ms.
        assert!(t.elapsed() >= Duration::from_millis(15), "{:?}", t.elapsed());
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_is_jittered_into_the_upper_half() {
        let r = NotifyRetry {
            attempts: 10,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
        };
        let at = |n, u| backoff_delay(&r, n, u);
        assert_eq!(
            [at(1, 1.0), at(2, 1.0), at(3, 1.0), at(4, 1.0), at(9, 1.0)],
            [1, 2, 4, 5, 5].map(Duration::from_secs)
        );
        assert_eq!(at(1, 0.0), Duration::from_millis(500));
        assert_eq!(at(3, 0.5), Duration::from_secs(3));
        assert_eq!(at(u32::MAX, 1.0), Duration::from_secs(5), "no overflow");
    }

    #[test]
    fn answers_are_judged_where_they_come() {
        let j = |c| match judge(http::StatusCode::from_u16(c).unwrap(), "u") {
            Outcome::Done(_) => "done",
            Outcome::Retry(_) => "retry",
            Outcome::Fail(_) => "fail",
        };
        assert_eq!(
            [200, 204, 503, 500, 429, 408, 404, 400, 302].map(j),
            ["done", "done", "retry", "retry", "retry", "retry", "fail", "fail", "fail"]
        );
    }

    #[test]
    fn changed_files_names_what_changed_appeared_or_went() {
        let s = |v: &[(&str, u8)]| Snapshot {
            files: v.iter().map(|(p, d)| (PathBuf::from(p), FileState::Content([*d; 32]))).collect(),
        };
        let before = s(&[("/v/a", 1), ("/v/b", 1), ("/v/c", 1)]);
        let after = s(&[("/v/a", 1), ("/v/b", 2), ("/v/d", 1)]);
        assert_eq!(changed_files(&before, &after), ["/v/b", "/v/c", "/v/d"].map(PathBuf::from));
        assert!(changed_files(&before, &before).is_empty());
    }

    #[test]
    fn processes_are_found_by_comm_or_argv0_topmost_only() {
        let dir = TempDir::new("notify-proc");
        let proc_ = |pid: i32, ppid: i32, state: char, comm: &str, cmdline: &[u8]| {
            let d = dir.path(&pid.to_string());
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("stat"), format!("{pid} ({comm}) {state} {ppid} 1 1 0 -1\n")).unwrap();
            std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(d.join("cmdline"), cmdline).unwrap();
        };
        proc_(1, 0, 'S', "pause", b"/pause\0");
        proc_(10, 1, 'S', "nginx", b"nginx: master process /usr/sbin/nginx\0");
        proc_(11, 10, 'S', "nginx", b"nginx: worker process\0");
        proc_(12, 10, 'S', "nginx", b"nginx: worker process\0");
        proc_(20, 1, 'S', "python3", b"/usr/bin/python3\0app.py\0");
        proc_(21, 1, 'S', "a-very-long-exe", b"/opt/bin/a-very-long-executable\0");
        proc_(22, 1, 'Z', "myapp", b"");
        proc_(23, 1, 'S', "sidecar", b"/sidecar\0run\0");
        proc_(30, 1, 'S', "weird) S 1 (x", b"/bin/weird\0");
        std::fs::create_dir(dir.path("self")).unwrap();
        assert_eq!(find_processes(&dir.0, "nginx", 999), [10]);
        assert_eq!(find_processes(&dir.0, "python3", 999), [20]);
        assert_eq!(find_processes(&dir.0, "app.py", 999), Vec::<i32>::new(), "argv[0] only");
        assert_eq!(find_processes(&dir.0, "a-very-long-executable", 999), [21]);
        assert_eq!(find_processes(&dir.0, "myapp", 999), Vec::<i32>::new(), "zombies are not signalled");
        assert_eq!(find_processes(&dir.0, "sidecar", 23), Vec::<i32>::new(), "never itself");
        assert_eq!(find_processes(&dir.0, "weird", 999), [30]);
        assert_eq!(parse_stat("30 (weird) S 1 (x) S 1 1 1"), Some(('S', 1)));
    }

    #[test]
    fn a_pid_file_must_hold_a_process_id() {
        let dir = TempDir::new("notify-pidfile");
        let f = dir.path("app.pid");
        assert!(read_pid_file(&f).unwrap_err().contains("No such file"));
        std::fs::write(&f, "1234\n").unwrap();
        assert_eq!(read_pid_file(&f), Ok(1234));
        std::fs::write(&f, "nope").unwrap();
        assert!(read_pid_file(&f).unwrap_err().contains("`nope` is not a process id"));
        std::fs::write(&f, "1").unwrap();
        assert!(read_pid_file(&f).is_err(), "never pid 1: the pause container or an init");
    }

    #[test]
    fn a_signal_reaches_a_real_child_found_by_pid_file() {
        let dir = TempDir::new("notify-signal");
        // `sleep` takes SIGUSR1's default action: it dies of it, which we can see.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let f = dir.path("app.pid");
        std::fs::write(&f, child.id().to_string()).unwrap();
        let s = NotifySignal { signal: SignalName::Usr1, target: ProcessTarget::PidFile(f.clone()) };
        assert!(matches!(send_signal(&s), Outcome::Done(_)));
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(10),
            "SIGUSR1 is 10 on Linux"
        );
        // Gone (and reaped): retried, not failed.
        assert!(matches!(send_signal(&s), Outcome::Retry(_)), "{:?}", send_signal(&s));
        let missing = NotifySignal {
            signal: SignalName::Hup,
            target: ProcessTarget::Process("no-such-process-here".into()),
        };
        let Outcome::Retry(why) = send_signal(&missing) else { panic!() };
        assert!(why.contains("shareProcessNamespace: true"), "{why}");
    }

    fn smallest() -> Config {
        crate::config::parse(
            Path::new("t.yaml"),
            "notify: [{ name: x, paths: [/x], signal: { process: x } }]\n",
        )
        .map_err(|e| e.problems)
        .unwrap_or_else(|p: Vec<Problem>| panic!("{p:?}"))
    }
}
