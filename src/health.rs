//! Watches the app's health and feeds readiness: an HTTP GET of `app.health.path` (2xx is
//! healthy) or, without one, a TCP connect to `app.address`.
//!
//! A config with no inbound listener and no `app.health` is not gated on the app at all.
//!
//! The app is ready after one passing check and unready after `FAILURES_TO_UNREADY` failing
//! ones in a row, so one slow GC pause does not pull the pod out of its Service.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::config::app::TCP_CHECK_INTERVAL;
use crate::config::{Config, HttpVersion};
use prometheus_client::registry::Registry;

use crate::drain::DrainWatch;
use crate::net::Addr;
use crate::readiness::ReadyHandle;

/// Failed checks in a row that make a healthy app unready (what the issue and Kubernetes'
/// own `failureThreshold` default ask for).
const FAILURES_TO_UNREADY: u32 = 3;

#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("connect to app {addr}: {source}; is the app listening?")]
    Connect { addr: Addr, source: std::io::Error },
    #[error("GET {path}: {source}")]
    Http { path: String, source: hyper::Error },
    #[error("GET {path} answered {status}")]
    Status { path: String, status: http::StatusCode },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// `sidecar_app_ready`, registered on the shared registry; `run` keeps it current.
pub fn register_metrics(registry: &mut Registry) -> Gauge {
    let gauge = Gauge::default();
    registry.register("app_ready", "1 when the app passes its health check", gauge.clone());
    gauge
}

/// Checks the app until the drain begins or the config channel closes, feeding `ready`
/// (the readiness task `app`) and `gauge`.
pub async fn run(
    mut config: watch::Receiver<Arc<Config>>,
    ready: ReadyHandle,
    gauge: Gauge,
    mut drain: DrainWatch,
) {
    let mut failures = 0u32;
    let mut healthy = false;
    loop {
        let (app, ungated) = {
            let c = config.borrow_and_update();
            // An ambassador-only sidecar does not stand in front of the app: unless told how
            // to check it (`app.health`), the app's health is not its readiness.
            (c.app.clone(), c.inbound.is_empty() && c.app.health.is_none())
        };
        if ungated {
            ready.set(true);
            gauge.set(1);
            tokio::select! {
                changed = config.changed() => if changed.is_err() { return },
                _ = drain.signaled() => return,
            }
            continue;
        }
        let (interval, timeout) = match &app.health {
            Some(h) => (h.interval, h.timeout),
            None => (TCP_CHECK_INTERVAL, TCP_CHECK_INTERVAL),
        };
        let result = match tokio::time::timeout(timeout, check(&app)).await {
            Ok(r) => r,
            Err(_) => Err(CheckError::Timeout(timeout)),
        };
        match result {
            Ok(()) => {
                if !healthy {
                    tracing::info!(app = %app.address, "app is healthy");
                }
                failures = 0;
                healthy = true;
            }
            Err(e) => {
                failures += 1;
                if healthy && failures >= FAILURES_TO_UNREADY {
                    tracing::warn!(error = %e, failures, "app failed its health check; not ready");
                    healthy = false;
                } else {
                    tracing::debug!(error = %e, failures, "app health check failed");
                }
            }
        }
        ready.set(healthy);
        gauge.set(healthy as i64);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            changed = config.changed() => if changed.is_err() { return },
            _ = drain.signaled() => return,
        }
    }
}

async fn check(app: &crate::config::AppConfig) -> Result<(), CheckError> {
    let addr = &app.address;
    let stream = addr.connect().await.map_err(|source| CheckError::Connect { addr: addr.clone(), source })?;
    let Some(health) = &app.health else {
        return Ok(());
    };
    let path = health.path.clone();
    let http_err = |source| CheckError::Http { path: path.clone(), source };
    let io = TokioIo::new(stream);
    // An app that speaks only HTTP/2 (a gRPC server) is asked in HTTP/2.
    let resp = if app.http == HttpVersion::Http2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(http_err)?;
        let conn_task = tokio::spawn(conn);
        let uri = format!("http://{}{path}", addr.authority());
        let resp = sender.send_request(health_request(&uri, addr, false)).await.map_err(http_err);
        conn_task.abort();
        resp
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(http_err)?;
        let conn_task = tokio::spawn(conn);
        let resp = sender.send_request(health_request(&path, addr, true)).await.map_err(http_err);
        conn_task.abort();
        resp
    };
    let status = resp?.status();
    if status.is_success() { Ok(()) } else { Err(CheckError::Status { path, status }) }
}

fn health_request(uri: &str, addr: &Addr, http1: bool) -> Request<Empty<Bytes>> {
    let mut b = Request::get(uri).header(header::USER_AGENT, "sidecar-health");
    if http1 {
        b = b.header(header::HOST, addr.authority()).header(header::CONNECTION, "close");
    }
    // The path was validated at config load (starts with `/`, no spaces), so the request is
    // well formed.
    b.body(Empty::new()).unwrap_or_default()
}
