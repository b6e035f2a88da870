//! `sidecar webhook`: the mutating admission webhook server. HTTPS (h2 and HTTP/1.1, the
//! serving certificate rotated like a listener's) on `webhook.listen`, `/live`, `/ready` and
//! `/metrics` on `admin.listen`, a drain on SIGTERM.
//!
//! Every body is bounded in size and time and every failure is answered: a malformed review
//! gets 400, a review it cannot handle gets the failure policy's answer, and nothing waits
//! past `webhook.request_timeout`. The decision itself is `review.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{reply, scrape, text};
use crate::config::InboundTls;
use crate::config::webhook::WebhookFile;
use crate::drain::{Drain, DrainWatch};
use crate::files::FileWatcher;
use crate::telemetry::metrics::{Exposition, registry};
use crate::tls::{ServerTls, TlsError};

pub mod install;
mod review;
pub use review::Mode;
use review::{Metrics, Reviewer};

/// The API server stores objects of up to 1.5 MiB (etcd's request limit) and a review may
/// carry the old object too: 8 MiB leaves room and still bounds what a client can make us
/// hold.
const MAX_REVIEW_BYTES: usize = 8 << 20;
/// A TLS handshake that takes longer is dropped (the API server's take milliseconds).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight reviews may take to finish after SIGTERM: a review takes well under
/// `request_timeout`, so this only waits out slow clients.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The serving certificate's files are checked this often (cert-manager or a re-run of
/// `sidecar certs webhook` replaces the Secret; the kubelet swaps the mounted files).
const FILE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("bind {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("serving certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("start: {0}")]
    Start(std::io::Error),
}

/// Runs the webhook until SIGTERM or SIGINT, then drains. Returns once in-flight reviews are
/// answered (or `DRAIN_TIMEOUT` passed: false).
pub fn run(file: WebhookFile) -> Result<bool, WebhookError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(WebhookError::Start)?;
    runtime.block_on(serve(file))
}

async fn serve(file: WebhookFile) -> Result<bool, WebhookError> {
    let mut registry = registry();
    let metrics = Metrics::register(&mut registry);
    let expiry = Gauge::default();
    registry.register(
        "webhook_cert_expiry_timestamp_seconds",
        "When the webhook's serving certificate expires, in seconds since the epoch",
        expiry.clone(),
    );
    let watcher = FileWatcher::start(FILE_POLL).map_err(|e| WebhookError::Start(std::io::Error::other(e)))?;
    let files = InboundTls {
        cert: file.cert.clone(),
        key: file.key.clone(),
        client_ca: None,
        allowed_identities: Vec::new(),
        handshake_timeout: HANDSHAKE_TIMEOUT,
    };
    let tls =
        ServerTls::load(&files, vec![b"h2".to_vec(), b"http/1.1".to_vec()], expiry, &watcher, "webhook")?;
    let bind = |addr| async move {
        TcpListener::bind(addr).await.map_err(|error| WebhookError::Bind { addr, error })
    };
    let listener = bind(file.listen).await?;
    let admin = bind(file.admin.listen).await?;

    let ready = Arc::new(AtomicBool::new(true));
    let exposition = Arc::new(Exposition::new(Arc::new(registry), Vec::new(), std::time::SystemTime::now()));
    tokio::spawn(serve_admin(admin, ready.clone(), exposition));
    let reviewer = Arc::new(Reviewer { defaults: file.inject.clone(), policy: file.failure_policy, metrics });
    let (drain, watch) = Drain::new();
    tracing::info!(listen = %file.listen, admin = %file.admin.listen, policy = ?file.failure_policy, "webhook serving");
    let accepting = tokio::spawn(accept(listener, tls, reviewer, file.request_timeout, watch));

    let mut sigterm = signal(SignalKind::terminate()).map_err(WebhookError::Start)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(WebhookError::Start)?;
    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal = why, "webhook draining");
    ready.store(false, Ordering::Release);
    drain.start();
    let clean = drain.wait(DRAIN_TIMEOUT).await;
    accepting.abort();
    watcher.stop();
    Ok(clean)
}

async fn accept(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    reviewer: Arc<Reviewer>,
    timeout: Duration,
    mut drain: DrainWatch,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => return,
        };
        let acceptor = tls.acceptor();
        let reviewer = reviewer.clone();
        let mut held = drain.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(error = %e, "webhook TLS handshake failed"),
                Err(_) => return tracing::debug!("webhook TLS handshake timed out"),
            };
            let svc = service_fn(move |req| {
                let reviewer = reviewer.clone();
                async move { Ok::<_, Infallible>(handle(req, &reviewer, timeout).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = held.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// One HTTP request on the webhook port.
async fn handle(
    req: Request<Incoming>,
    reviewer: &Arc<Reviewer>,
    timeout: Duration,
) -> Response<Full<Bytes>> {
    let mode = match req.uri().path() {
        "/inject" => Mode::Namespace,
        "/inject-annotated" => Mode::Annotated,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found; the webhook serves POST /inject and /inject-annotated\n",
            );
        }
    };
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
    }
    let json = req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_none_or(|v| {
        v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        reviewer.metrics.count("invalid");
        return text(StatusCode::UNSUPPORTED_MEDIA_TYPE, "an AdmissionReview is application/json\n");
    }
    let started = Instant::now();
    let body = match tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect())
        .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            reviewer.metrics.count("invalid");
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a review is at most {MAX_REVIEW_BYTES} bytes\n"),
            );
        }
        Ok(Err(e)) => {
            reviewer.metrics.count("invalid");
            return text(StatusCode::BAD_REQUEST, format!("reading the review: {e}\n"));
        }
        Err(_) => {
            reviewer.metrics.count("invalid");
            return text(StatusCode::REQUEST_TIMEOUT, "the review's body did not arrive in time\n");
        }
    };
    let answer = reviewer.review(mode, &body);
    reviewer.metrics.observe(started.elapsed().as_secs_f64());
    match answer {
        Ok(json) => reply(StatusCode::OK, "application/json", json),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// `/live`, `/ready` (503 once draining) and `/metrics`, in plain HTTP for the kubelet and
/// Prometheus.
async fn serve_admin(listener: TcpListener, ready: Arc<AtomicBool>, metrics: Arc<Exposition>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (ready, metrics) = (ready.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let answer = match (req.uri().path(), req.method()) {
                    ("/live", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "live\n"),
                    ("/ready", &Method::GET | &Method::HEAD) if ready.load(Ordering::Acquire) => {
                        text(StatusCode::OK, "ready\n")
                    }
                    ("/ready", &Method::GET | &Method::HEAD) => {
                        text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
                    }
                    ("/metrics", &Method::GET) => scrape(&req, &metrics),
                    _ => text(StatusCode::NOT_FOUND, "not found; try /live, /ready, /metrics\n"),
                };
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
