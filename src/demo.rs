//! `sidecar demo`: an embedded demo app with a real sidecar in front of it, so a newcomer
//! sees the proxy, the access log and the metrics working in a minute.
//!
//! The demo app runs on a thread and runtime of its own, as a separate process would; the
//! sidecar in front of it is the same `app::run` that `sidecar run` uses, with a config made
//! from the YAML below (printed, so it doubles as an example).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::config::{self, Config};

/// Addresses the demo uses; flags override them.
pub struct DemoAddrs {
    pub listen: SocketAddr,
    pub https: SocketAddr,
    pub mtls: SocketAddr,
    pub admin: SocketAddr,
    pub app: SocketAddr,
    /// The outbound (ambassador) listener the app would call.
    pub outbound: SocketAddr,
    /// Two demo upstreams behind it: a steady one and a flaky one. Port 0 until
    /// `start_app` binds them (ports the system picks: fixed ones next to the app's
    /// collided with other programs' ephemeral ports).
    pub upstreams: [SocketAddr; 2],
    /// The log receiver the demo app's log file is shipped to; port 0 until `start_app`.
    pub logs: SocketAddr,
    /// Where the demo's CA and certificates, the app's log file and the shipper's checkpoint
    /// are written (replaced at every start).
    pub certs: std::path::PathBuf,
}

impl DemoAddrs {
    /// The demo app's own log file, which the sidecar ships.
    pub fn app_log(&self) -> std::path::PathBuf {
        self.certs.join("app-logs").join("app.log")
    }

    /// The app's "mounted ConfigMap": the sidecar tells the app when it changes.
    pub fn app_config(&self) -> std::path::PathBuf {
        self.certs.join("app-config")
    }
}

/// The identity of the demo's client certificate, the only one the mTLS listener lets in.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// Writes a fresh dev CA, a server certificate for localhost and 127.0.0.1, and a client
/// certificate, with the same code as `sidecar certs`.
pub fn make_certs(addrs: &DemoAddrs) -> Result<(), crate::tls::certs::CertsError> {
    use crate::tls::certs;
    let dir = &addrs.certs;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|error| certs::CertsError::Io { path: dir.clone(), error })?;
    }
    certs::init(&dir.join("ca"))?;
    let dns = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    certs::issue(&dir.join("ca"), "spiffe://cluster.local/ns/demo/sa/app", &dns, &dir.join("server"))?;
    let app_config = addrs.app_config();
    std::fs::create_dir_all(&app_config)
        .and_then(|()| std::fs::write(app_config.join("greeting"), "hello\n"))
        .map_err(|error| certs::CertsError::Io { path: app_config.clone(), error })?;
    certs::issue(&dir.join("ca"), CLIENT_ID, &[], &dir.join("client"))
}

/// The demo's config, as a user would write it.
pub fn config_text(addrs: &DemoAddrs) -> String {
    format!(
        "admin:
  listen: {admin}
app:
  address: {app}
  http: auto
  health: {{ path: /healthz, interval: 1s, timeout: 1s }}
inbound:
  - name: web
    listen: {listen}
    protocol: http
    request_timeout: 5s
  - name: web-tls
    listen: {https}
    tls: {{ cert: {certs}/server/tls.crt, key: {certs}/server/tls.key }}
  - name: web-mtls
    listen: {mtls}
    tls:
      cert: {certs}/server/tls.crt
      key: {certs}/server/tls.key
      client_ca: {certs}/ca/ca.crt
      allowed_identities: [\"{client_id}\"]
outbound:
  - name: orders
    listen: {outbound}
    upstream:
      endpoints: [\"{steady}\", \"{flaky}\"]
    balance: round-robin
    retry: {{ attempts: 2, on: [connect-failure, reset, 503] }}
    outlier: {{ consecutive_failures: 2, base_ejection: 10s }}
logship:
  checkpoint_dir: {certs}/logship
  scan_interval: 500ms
  sources:
    - {{ name: demo-app, paths: [\"{app_logs}/*.log\"], format: json, fields: {{ app: demo }} }}
  sinks:
    - {{ name: receiver, type: http, endpoint: \"http://{logs}/ingest\", batch: {{ timeout: 500ms }} }}
telemetry:
  log_level: info
  access_log: {{ enabled: true, format: json, path: stdout }}
notify:
  - {{ name: app-config, paths: [\"{app_config}\"], debounce: 500ms, http: {{ url: \"http://{app}/-/reload\" }} }}
shutdown:
  drain_timeout: 5s
",
        admin = addrs.admin,
        app = addrs.app,
        listen = addrs.listen,
        https = addrs.https,
        mtls = addrs.mtls,
        certs = addrs.certs.display(),
        client_id = CLIENT_ID,
        outbound = addrs.outbound,
        steady = addrs.upstreams[0],
        flaky = addrs.upstreams[1],
        logs = addrs.logs,
        app_logs = addrs.app_log().parent().map(|p| p.display().to_string()).unwrap_or_default(),
        app_config = addrs.app_config().display(),
    )
}

/// Parses the demo config; it is generated here, so an error is a bug in this file.
pub fn config(addrs: &DemoAddrs) -> Result<Config, config::ConfigError> {
    config::parse(std::path::Path::new("<demo>"), &config_text(addrs))
}

/// Starts the demo app and the two demo upstreams, each listening on its own address, on
/// a thread of their own. Returns once they are listening.
pub fn start_app(addrs: &mut DemoAddrs) -> std::io::Result<()> {
    let app = bind(addrs.app)?;
    let steady = bind(addrs.upstreams[0])?;
    let flaky = bind(addrs.upstreams[1])?;
    let logs = bind(addrs.logs)?;
    addrs.upstreams = [steady.local_addr()?, flaky.local_addr()?];
    addrs.logs = logs.local_addr()?;
    let shared = Shared::open(&addrs.app_log())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("demo-app".into()).spawn(move || {
        runtime.block_on(async move {
            tokio::spawn(serve(steady, Server::Upstream { name: "steady", fail_two_in: 0 }, shared.clone()));
            tokio::spawn(serve(flaky, Server::Upstream { name: "flaky", fail_two_in: 3 }, shared.clone()));
            tokio::spawn(serve(logs, Server::LogReceiver, shared.clone()));
            serve(app, Server::App, shared).await
        })
    })?;
    Ok(())
}

/// `sidecar demo-app`: the demo app alone, as the app container of a pod (the image has no
/// other program), on `listen`, logging a JSON line a request to `log_file`. Serves until
/// SIGTERM or SIGINT and then returns at once: in-flight requests are the sidecar's to drain.
/// The handlers matter: as a container's PID 1 the process would otherwise ignore SIGTERM
/// and be killed ten seconds later by `docker stop`.
pub fn run_app(listen: SocketAddr, log_file: &std::path::Path) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let app = bind(listen)?;
        let shared = Shared::open(log_file)?;
        eprintln!(
            "demo app listening on {}, logging requests to {}; try /, /healthz, /slow?ms=N, /status/N",
            app.local_addr()?,
            log_file.display()
        );
        tokio::select! {
            _ = serve(app, Server::App, shared) => {}
            _ = sigterm.recv() => eprintln!("demo app: SIGTERM, exiting"),
            _ = sigint.recv() => eprintln!("demo app: SIGINT, exiting"),
        }
        Ok(())
    })
}

/// A non-blocking listener for a demo server; the error names the address.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// What the demo servers share: the app's log file, and the lines the receiver got.
#[derive(Clone)]
struct Shared {
    app_log: Arc<Mutex<std::fs::File>>,
    received: Arc<Mutex<std::collections::VecDeque<String>>>,
    /// The config-change notifications the app got: how many, and the last body.
    told: Arc<Mutex<(u64, String)>>,
}

impl Shared {
    /// Opens (creating it and its directory) the app's log file, for appending.
    fn open(log_file: &std::path::Path) -> std::io::Result<Shared> {
        let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", log_file.display()));
        if let Some(dir) = log_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(named)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log_file).map_err(named)?;
        Ok(Shared {
            app_log: Arc::new(Mutex::new(file)),
            received: Arc::new(Mutex::new(std::collections::VecDeque::new())),
            told: Arc::new(Mutex::new((0, String::new()))),
        })
    }
}

/// The receiver keeps this many of the lines shipped to it.
const RECEIVED_KEPT: usize = 50;

/// What a demo server is: the app, or an upstream the app calls through the sidecar.
#[derive(Clone, Copy)]
enum Server {
    App,
    /// Answers `/` with its name; two requests in every `fail_two_in` get a 503.
    Upstream {
        name: &'static str,
        fail_two_in: u64,
    },
    /// Where the app's log lines are shipped: takes NDJSON POSTs, shows the last ones on GET.
    LogReceiver,
}

/// What the demo prints on start.
pub fn banner(addrs: &DemoAddrs) -> String {
    let base = format!("http://{}", addrs.listen);
    let admin = format!("http://{}", addrs.admin);
    format!(
        "
Sidecar demo: a sidecar on {listen} in front of a demo app on {app}.

Open {admin}/ in a browser: the live page (rates, errors, latency, endpoints, certificates).

Try these (the access log appears below, one JSON line per request):
  curl -i {base}/
  curl -i --http2-prior-knowledge {base}/
  curl -i --cacert {certs}/ca/ca.crt https://localhost:{https_port}/
  curl -i --cacert {certs}/ca/ca.crt --cert {certs}/client/tls.crt --key {certs}/client/tls.key https://localhost:{mtls_port}/
  curl -i --cacert {certs}/ca/ca.crt https://localhost:{mtls_port}/     (refused: no client certificate)
  curl -i -X POST --data 'hello sidecar' {base}/echo
  curl -i {base}/slow?ms=1500
  curl -i {base}/status/503
  curl -s -H 'traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' {base}/headers
                                 (the app sees the sidecar's span as its parent; trace_id in the log)
  curl -s {admin}/stats
  curl -s {admin}/metrics | grep sidecar_inbound_requests_total
  curl -s {admin}/ready
  curl -s {admin}/config
  python3 -m websockets ws://{listen}/ws     (WebSocket echo)

The app's outbound calls (ambassador): {outbound} carries them to two upstreams, one of
which fails two requests in three; retries hide it and ejection takes it out of rotation:
  for i in $(seq 20); do curl -s http://{outbound}/; done
  curl -s {admin}/metrics | grep -E 'sidecar_outbound_(requests|retries|endpoints)'

Log shipping: the app writes a JSON line a request to {app_log};
the sidecar tails it and ships every line to a receiver, which shows the last ones it got:
  curl -s http://{logs}/
  curl -s {admin}/metrics | grep sidecar_logship_

Config-change notifications: the sidecar watches {app_config} as it would a mounted
ConfigMap and, when its content changes, POSTs to the app's /-/reload, which shows what it was told:
  echo hi > {app_config}/greeting; sleep 2; curl -s http://{app}/-/reload

Config in use:
{config}
Ctrl-C drains and exits.
",
        listen = addrs.listen,
        app = addrs.app,
        outbound = addrs.outbound,
        logs = addrs.logs,
        app_log = addrs.app_log().display(),
        app_config = addrs.app_config().display(),
        certs = addrs.certs.display(),
        https_port = addrs.https.port(),
        mtls_port = addrs.mtls.port(),
        config = config_text(addrs).lines().map(|l| format!("  {l}\n")).collect::<String>(),
    )
}

type AppBody = BoxBody<Bytes, hyper::Error>;

async fn serve(listener: std::net::TcpListener, role: Server, shared: Shared) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let served = served.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let shared = shared.clone();
                async move {
                    Ok::<_, Infallible>(match role {
                        Server::App => {
                            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                            let resp = app(req, &shared).await;
                            // The sidecar's health checks would drown the requests a person makes.
                            if path != "/healthz" {
                                write_app_log(&shared, &method, &path, resp.status());
                            }
                            resp
                        }
                        Server::LogReceiver => receive_logs(req, &shared).await,
                        Server::Upstream { name, fail_two_in } => {
                            upstream(name, fail_two_in != 0 && !n.is_multiple_of(fail_two_in))
                        }
                    })
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<AppBody> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn app(mut req: Request<Incoming>, shared: &Shared) -> Response<AppBody> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        // Where the sidecar says the app's config changed (`notify`); GET shows what it said.
        "/-/reload" if req.method() == http::Method::POST => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if let Ok(mut told) = shared.told.lock() {
                *told = (told.0 + 1, String::from_utf8_lossy(&body).into_owned());
            }
            full(StatusCode::OK, "text/plain", "reloaded\n")
        }
        "/-/reload" => {
            let (count, last) = shared.told.lock().map(|t| t.clone()).unwrap_or_default();
            full(
                StatusCode::OK,
                "text/plain",
                format!("told of {count} config change(s); the last: {last}\n"),
            )
        }
        "/" => {
            let body = serde_json::json!({
                "message": "hello from the demo app",
                "method": req.method().as_str(),
                "protocol": format!("{:?}", req.version()),
                "forwarded_for": req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()),
                "forwarded_proto": req.headers().get("x-forwarded-proto").and_then(|v| v.to_str().ok()),
            });
            full(StatusCode::OK, "application/json", format!("{body}\n"))
        }
        "/healthz" => full(StatusCode::OK, "text/plain", "ok\n"),
        "/headers" => {
            // What reached the app: the forwarding and trace headers the sidecar set.
            let headers: serde_json::Map<_, _> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            full(StatusCode::OK, "application/json", format!("{}\n", serde_json::Value::Object(headers)))
        }
        "/slow" => {
            let ms = query_u64(&req, "ms").unwrap_or(2000).min(60_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            full(StatusCode::OK, "text/plain", format!("slept {ms} ms\n"))
        }
        "/echo" => {
            // Streams the request body back as it arrives.
            let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
            let mut r = Response::new(req.into_body().boxed());
            if let Some(ct) = content_type {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            r
        }
        "/ws" => websocket(&mut req),
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..].parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
            match code {
                Some(c) => full(c, "text/plain", format!("{c}\n")),
                None => full(StatusCode::BAD_REQUEST, "text/plain", "usage: /status/NNN\n"),
            }
        }
        _ => full(
            StatusCode::NOT_FOUND,
            "text/plain",
            "demo app: try /, /headers, /echo, /slow?ms=N, /status/N, /ws, /healthz, /-/reload\n",
        ),
    }
}

/// The demo app logs as apps do: a JSON line a request, to a file on its "volume".
fn write_app_log(shared: &Shared, method: &http::Method, path: &str, status: StatusCode) {
    use std::io::Write as _;
    let level = if status.is_server_error() { "error" } else { "info" };
    let line = serde_json::json!({
        "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "level": level,
        "msg": "request handled",
        "method": method.as_str(),
        "path": path,
        "status": status.as_u16(),
    });
    if let Ok(mut f) = shared.app_log.lock() {
        let _ = writeln!(f, "{line}");
    }
}

/// `POST /ingest` takes the shipped NDJSON; `GET /` shows the last lines received.
async fn receive_logs(req: Request<Incoming>, shared: &Shared) -> Response<AppBody> {
    if req.method() == http::Method::POST {
        let Ok(body) = req.into_body().collect().await else {
            return full(StatusCode::BAD_REQUEST, "text/plain", "unreadable body\n");
        };
        let body = body.to_bytes();
        if let Ok(mut kept) = shared.received.lock() {
            for line in String::from_utf8_lossy(&body).lines() {
                kept.push_back(line.to_owned());
                while kept.len() > RECEIVED_KEPT {
                    kept.pop_front();
                }
            }
        }
        return full(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
    }
    let text = shared
        .received
        .lock()
        .map(|k| k.iter().map(|l| format!("{l}\n")).collect::<String>())
        .unwrap_or_default();
    full(StatusCode::OK, "application/x-ndjson", text)
}

fn upstream(name: &str, fail: bool) -> Response<AppBody> {
    if fail {
        return full(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{name}: failing this one\n"));
    }
    let body = serde_json::json!({ "upstream": name, "message": "hello from a demo upstream" });
    full(StatusCode::OK, "application/json", format!("{body}\n"))
}

/// A WebSocket echo (RFC 6455): answers the handshake, then sends back every message.
fn websocket(req: &mut Request<Incoming>) -> Response<AppBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "expected a WebSocket upgrade\n");
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                .await;
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_text() || msg.is_binary() {
                if tx.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    let mut r = full(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    let h = r.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
