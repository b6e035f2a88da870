//! The admin server: the live page (`/` and its `/stats`), `/live`, `/ready`, `/metrics`,
//! `/config`, `/log-level`, `/shutdown`.
//!
//! It runs on its own thread and single-threaded runtime, like ztunnel's: encoding metrics or
//! the config is work the data plane's workers must never wait behind, and a stuck data plane
//! must not stop `/live` and `/metrics` from answering.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::readiness::Readiness;
use crate::telemetry::metrics::{Exposition, Format};
use crate::telemetry::{LogHandle, Tracer};

mod stats;
pub use stats::{Board, ErrorEntry};

/// The live page: one self-contained file (inline CSS and script, no external assets) that
/// polls `/stats`.
const PAGE: &str = include_str!("admin/page.html");

/// A `PUT /log-level` body larger than this is refused: a filter is a line of text.
const MAX_FILTER_BYTES: usize = 4096;

/// What the admin server reads and the one thing it may ask of the process.
#[derive(Clone)]
pub struct AdminState {
    pub readiness: Arc<Readiness>,
    /// Every family, registered by its module at start, and the process's.
    pub metrics: Arc<Exposition>,
    /// What is running and the last errors, for the live page.
    pub board: Arc<Board>,
    pub tracer: Tracer,
    pub started: std::time::SystemTime,
    pub config: watch::Receiver<Arc<Config>>,
    pub log: Option<LogHandle>,
    /// `POST /shutdown` sends here; the process begins its drain.
    pub shutdown: mpsc::Sender<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin server: bind {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("admin server: start: {0}")]
    Start(std::io::Error),
}

/// Binds now (so a taken port fails start-up) and serves on a thread of its own until the
/// process exits.
pub fn start(addr: SocketAddr, state: AdminState) -> Result<SocketAddr, AdminError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|error| AdminError::Bind { addr, error })?;
    listener.set_nonblocking(true).map_err(AdminError::Start)?;
    let local = listener.local_addr().map_err(AdminError::Start)?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AdminError::Start)?;
    std::thread::Builder::new()
        .name("sidecar-admin".into())
        .spawn(move || runtime.block_on(serve(listener, state)))
        .map_err(AdminError::Start)?;
    Ok(local)
}

async fn serve(listener: std::net::TcpListener, state: AdminState) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin server could not start");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, &state, peer).await) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

pub(crate) fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

async fn route(req: Request<Incoming>, state: &AdminState, peer: SocketAddr) -> Response<Full<Bytes>> {
    if controls(req.uri().path(), req.method())
        && !peer.ip().is_loopback()
        && !state.config.borrow().admin.remote_control
    {
        return text(
            StatusCode::FORBIDDEN,
            "only from inside the pod (a loopback peer); set admin.remote_control: true to allow it from elsewhere\n",
        );
    }
    let path = req.uri().path();
    let method = req.method().clone();
    match (path, &method) {
        ("/", &Method::GET | &Method::HEAD) => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        ("/stats", &Method::GET) => {
            let json = stats::render(&state.board, &state.readiness, &state.tracer, state.started);
            let mut r = reply(StatusCode::OK, "application/json", json);
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        ("/live", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "live\n"),
        ("/ready", &Method::GET | &Method::HEAD) => {
            let waiting = state.readiness.not_ready();
            if waiting.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", waiting.join(", ")))
            }
        }
        ("/metrics", &Method::GET) => metrics(&req, state),
        ("/config", &Method::GET) => config(&req, state),
        ("/log-level", &Method::GET) => match &state.log {
            Some(log) => text(StatusCode::OK, format!("{}\n", log.current())),
            None => text(StatusCode::NOT_FOUND, "log level is not managed by this process\n"),
        },
        ("/log-level", &Method::PUT | &Method::POST) => set_log_level(req, state).await,
        ("/shutdown", &Method::POST) => {
            tracing::info!("shutdown requested through the admin server");
            let _ = state.shutdown.try_send(());
            text(StatusCode::OK, "draining\n")
        }
        // Kubernetes runs a native sidecar's preStop hook as soon as the pod starts
        // terminating, beside the app's, but sends SIGTERM only once the app has exited
        // (KEP-753). So the hook only announces: the pod leaves the endpoints, while the app
        // keeps its inbound, outbound and log shipping until it is gone; SIGTERM drains.
        ("/prestop", &Method::POST) => {
            tracing::info!("the pod is terminating (preStop): not ready from now on, serving until SIGTERM");
            state.readiness.set_draining();
            text(StatusCode::OK, "not ready; serving until SIGTERM\n")
        }
        (
            "/" | "/stats" | "/live" | "/ready" | "/metrics" | "/config" | "/log-level" | "/shutdown"
            | "/prestop",
            _,
        ) => text(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {path}\n")),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /, /stats, /live, /ready, /metrics, /config, /log-level, /shutdown, /prestop\n",
        ),
    }
}

/// The endpoints that change the process or show its config: loopback peers only, unless
/// `admin.remote_control`.
fn controls(path: &str, method: &Method) -> bool {
    matches!(
        (path, method),
        ("/shutdown" | "/prestop", &Method::POST)
            | ("/log-level", &Method::PUT | &Method::POST)
            | ("/config", _)
    )
}

fn wants(req: &Request<Incoming>, needle: &str) -> bool {
    req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(needle))
}

fn metrics(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    scrape(req, &state.metrics)
}

/// A `/metrics` answer in the format the scraper asked for; the webhook's admin uses it too.
pub(crate) fn scrape(req: &Request<Incoming>, metrics: &Exposition) -> Response<Full<Bytes>> {
    let (format, content_type) = if wants(req, "application/openmetrics-text") {
        (Format::OpenMetrics, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        (Format::Prometheus, "text/plain; version=0.0.4; charset=utf-8")
    };
    let mut out = String::with_capacity(32 * 1024);
    if let Err(e) = metrics.encode(format, &mut out) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n"));
    }
    reply(StatusCode::OK, content_type, out)
}

fn config(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let config = state.config.borrow().clone();
    // The typed config holds no secret material: TLS keys and tokens are referenced by
    // path and never read into it.
    let json = req.uri().query().is_some_and(|q| q.contains("format=json")) || wants(req, "application/json");
    if json {
        match serde_json::to_string_pretty(&*config) {
            Ok(s) => reply(StatusCode::OK, "application/json", s + "\n"),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    } else {
        match serde_yaml_ng::to_string(&*config) {
            Ok(s) => reply(StatusCode::OK, "application/yaml", s),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }
}

async fn set_log_level(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let Some(log) = &state.log else {
        return text(StatusCode::NOT_FOUND, "log level is not managed by this process\n");
    };
    let body = match Limited::new(req.into_body(), MAX_FILTER_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "a log filter is one short line\n"),
    };
    let Ok(filter) = std::str::from_utf8(&body) else {
        return text(StatusCode::BAD_REQUEST, "the body must be a UTF-8 log filter, like `debug`\n");
    };
    match log.set(filter) {
        Ok(()) => {
            tracing::info!(filter = filter.trim(), "log level changed through the admin server");
            text(StatusCode::OK, format!("{}\n", log.current()))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}
