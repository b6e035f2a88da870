//! The inbound HTTP server: one client connection from first byte to close, and each
//! request's trip to the app and back.
//!
//! Life of a connection: detect HTTP/2 prior knowledge by the preface, else HTTP/1.1 behind
//! the framing guard → hyper serves it, supervised for header and idle timeouts and drain →
//! each request: hop-by-hop headers out, forwarding headers in, target rewritten for the
//! app's protocol → the app's pool → the response streamed back, and when its body ends,
//! metrics, the access-log record, and the app connection back to the pool.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::ListenerCtx;
use super::guard::{ConnState, Guard};
use super::io::{DetectError, Detected, ServerIo, detect};
use crate::config::{HttpVersion, Limits};
use crate::drain::DrainWatch;
use crate::proxy::body::{BodyStats, OnEnd, RequestBody, ResponseBody};
use crate::proxy::headers::{
    Forwarding, X_CLIENT_IDENTITY, X_FORWARDED_CLIENT_CERT, sanitize_request, strip_hop_by_hop,
    to_absolute_form, to_origin_form, wants_upgrade,
};
use crate::proxy::pool::{H1Conn, Proto, Sticky};
use crate::telemetry::access_log::{AccessRecord, trace_id};
use crate::telemetry::metrics::Reject;
use crate::tls::PeerIdentity;

type Body = ResponseBody<RequestEnd>;

/// Streams one HTTP/2 client may open at once. 100 is the RFC 9113 recommended minimum
/// and what most servers use; enough for gRPC fan-out, small enough to bound a client.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Streams a client may reset before we answer them (CVE-2023-44487, rapid reset): past
/// this, the connection gets GOAWAY (ENHANCE_YOUR_CALM). h2's own default.
const MAX_PENDING_RESETS: usize = 20;
/// Streams we may reset for protocol errors before closing the connection: bounds the work
/// a client can cause by sending frames that each cost us a RST (h2's own default).
const MAX_LOCAL_RESETS: usize = 1024;

/// hyper connection builders for one listener's limits.
pub struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    pub fn new(limits: &Limits) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // The guard times request heads; hyper's timer would also run between
            // keep-alive requests and close idle connections early.
            .header_read_timeout(None)
            .max_header_size(limits.max_header_bytes)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .max_local_error_reset_streams(MAX_LOCAL_RESETS)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Builders { h1, h2 }
    }
}

/// One client connection's view, shared by its requests.
struct Conn {
    listener: Arc<ListenerCtx>,
    peer: SocketAddr,
    state: Arc<ConnState>,
    forwarding: Forwarding,
    drain: DrainWatch,
    /// The verified client, on mTLS listeners.
    identity: Option<Arc<PeerIdentity>>,
    /// False when `tls.allowed_identities` does not include the client: every request on
    /// the connection gets 403.
    allowed: bool,
    /// The app connection this client connection uses between requests.
    sticky: Sticky,
}

/// How a supervised connection ended, when not by hyper.
enum Ended {
    Done,
    HeaderTimeout,
}

pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<ListenerCtx>, drain: DrainWatch) {
    let _ = stream.set_nodelay(true);
    let Some(tls) = ctx.tls.clone() else {
        return serve_plain(stream, peer, ctx, drain).await;
    };
    let Some(accepted) = super::tls::accept(stream, &tls, &ctx, peer).await else {
        return;
    };
    let allowed = super::tls::allowed(&tls, accepted.identity.as_deref());
    let protocol = if accepted.h2 { Detected::Http2 } else { Detected::Http1 };
    let conn = Conn {
        listener: ctx.clone(),
        peer,
        state: ConnState::new(),
        forwarding: Forwarding::new(peer.ip(), true),
        drain: drain.clone(),
        identity: accepted.identity,
        allowed,
        sticky: Sticky::new(ctx.pool.clone()),
    };
    serve_http(accepted.stream, protocol, conn).await;
}

async fn serve_plain(stream: TcpStream, peer: SocketAddr, ctx: Arc<ListenerCtx>, drain: DrainWatch) {
    let limits = &ctx.config.limits;
    let detected = match detect(&stream, limits.header_read_timeout).await {
        Ok(Detected::Closed) => return,
        Ok(d) => d,
        Err(DetectError::Timeout) => {
            ctx.metrics.reject(Reject::HeaderTimeout);
            return;
        }
        Err(DetectError::Io(e)) => {
            tracing::debug!(%peer, error = %e, "client connection failed");
            return;
        }
    };
    let conn = Conn {
        listener: ctx.clone(),
        peer,
        state: ConnState::new(),
        forwarding: Forwarding::new(peer.ip(), false),
        drain,
        identity: None,
        allowed: true,
        sticky: Sticky::new(ctx.pool.clone()),
    };
    serve_http(stream, detected, conn).await;
}

/// Serves HTTP on an established (plain or TLS) connection until it closes.
async fn serve_http<S>(stream: S, detected: Detected, conn: Conn)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state = conn.state.clone();
    let ctx = conn.listener.clone();
    let drain = conn.drain.clone();
    let peer = conn.peer;
    let limits = &ctx.config.limits;
    let conn = Arc::new(conn);
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, conn).await) }
    });
    let ended = match detected {
        Detected::Http2 => {
            state.head_started.store(0, Ordering::Relaxed);
            let io = TokioIo::new(ServerIo::new(stream, None, state.clone()));
            let conn = ctx.http.h2.serve_connection(io, svc);
            supervise(conn, |c| c.graceful_shutdown(), &state, limits, drain).await
        }
        _ => {
            let io = TokioIo::new(ServerIo::new(stream, Some(Guard::new(state.clone())), state.clone()));
            let conn = ctx.http.h1.serve_connection(io, svc).with_upgrades();
            supervise(conn, |c| c.graceful_shutdown(), &state, limits, drain).await
        }
    };
    let reason = match ended {
        Ok(Ended::Done) => None,
        Ok(Ended::HeaderTimeout) => Some(Reject::HeaderTimeout),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
            classify(&e, &state)
        }
    };
    if let Some(reason) = reason {
        ctx.metrics.reject(reason);
    }
}

/// Which refusal, if any, a connection error was.
fn classify(e: &hyper::Error, state: &ConnState) -> Option<Reject> {
    if state.refused.load(Ordering::Relaxed) {
        return Some(Reject::Smuggling);
    }
    if e.is_parse_too_large() {
        return Some(Reject::HeadersTooLarge);
    }
    if e.is_parse() {
        return Some(Reject::Malformed);
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            // A GOAWAY we sent (rapid reset, CONTINUATION flood, protocol violation).
            return (h2.is_go_away() && h2.is_library()).then_some(Reject::Http2Protocol);
        }
        source = s.source();
    }
    None
}

/// Drives a connection while enforcing the header timeout (a request head must arrive
/// whole within `header_read_timeout` of its first byte, or of the connection's start),
/// the idle timeout (no request in flight and no bytes for `idle_timeout`) and the drain
/// (idle HTTP/1 closed, busy HTTP/1 closed after the current response, HTTP/2 GOAWAY).
/// One timer per connection, ticking at half the smaller timeout.
///
/// Written as a poll function rather than `select!`: the task wakes two or three times per
/// request, almost always for the connection, and `select!` would poll the drain signal (a
/// lock inside the watch) and the timer on every one of those wake-ups. Here each is polled
/// only to register this task's waker (once, and after each timer reset); a wake-up then
/// checks them with plain reads: the drain flag and the timer's elapsed bit.
async fn supervise<C: Future<Output = Result<(), hyper::Error>>>(
    conn: C,
    shut_down: fn(std::pin::Pin<&mut C>),
    state: &ConnState,
    limits: &Limits,
    mut drain: DrainWatch,
) -> Result<Ended, hyper::Error> {
    use std::task::Poll;

    let mut conn = std::pin::pin!(conn);
    let header_ms = limits.header_read_timeout.as_millis() as u64;
    let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 2).max(Duration::from_millis(50));
    let mut sleep = std::pin::pin!(tokio::time::sleep(tick));
    let mut last_activity = state.activity.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    let mut shutting_down = false;
    let draining = drain.clone();
    let mut drained = std::pin::pin!(drain.signaled());
    let mut drain_armed = false;
    let mut timer_armed = false;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(res.map(|()| Ended::Done));
            }
            if !shutting_down {
                let drain_now = if drain_armed {
                    draining.is_draining()
                } else {
                    drain_armed = true;
                    drained.as_mut().poll(cx).is_ready()
                };
                if drain_now {
                    shutting_down = true;
                    shut_down(conn.as_mut());
                    continue; // the connection acts on it when polled
                }
            }
            if timer_armed && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            if !timer_armed {
                timer_armed = true;
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // The tick: check the timeouts, then re-arm the timer.
            let now = Instant::now();
            sleep.as_mut().reset((now + tick).into());
            timer_armed = false;
            let activity = state.activity.load(Ordering::Relaxed);
            if activity != last_activity {
                last_activity = activity;
                last_change = now;
            }
            let head = state.head_started.load(Ordering::Relaxed);
            if head != 0 && state.now_ms().saturating_sub(head) >= header_ms {
                return Poll::Ready(Ok(Ended::HeaderTimeout));
            }
            let idle = state.in_flight.load(Ordering::Relaxed) == 0
                && now.duration_since(last_change) >= limits.idle_timeout;
            if idle {
                if shutting_down {
                    return Poll::Ready(Ok(Ended::Done));
                }
                shutting_down = true;
                shut_down(conn.as_mut());
            }
        }
    })
    .await
}

/// The end of one request: metrics, the access-log record, the app connection returned.
/// Runs when the response body ends or is dropped, so durations include the body.
struct RequestEnd {
    conn: Arc<Conn>,
    start: Instant,
    wall: SystemTime,
    method: Method,
    uri: Option<Uri>,
    version: Version,
    status: u16,
    trace_id: Option<Box<str>>,
    error: Option<&'static str>,
    req_stats: Option<Arc<BodyStats>>,
    app_conn: Option<H1Conn>,
}

impl OnEnd for RequestEnd {
    fn on_end(self, bytes_out: u64, complete: bool) {
        let conn = &self.conn;
        conn.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        let elapsed = self.start.elapsed();
        conn.listener.metrics.request(self.status, elapsed);
        let body_sent = self.req_stats.as_ref().is_none_or(|s| s.done.load(Ordering::Relaxed));
        if let Some(app_conn) = self.app_conn {
            // Reusable only when both bodies went through whole; otherwise hyper is
            // closing the connection, and dropping the handle lets it.
            if complete && body_sent {
                conn.sticky.give_back(app_conn);
            }
        }
        let access_log = &conn.listener.access_log;
        if access_log.enabled() {
            access_log.log(AccessRecord {
                start: self.wall,
                direction: "inbound",
                listener: conn.listener.metrics.name.clone(),
                method: self.method,
                uri: self.uri.unwrap_or_default(),
                version: self.version,
                status: self.status,
                duration: elapsed,
                bytes_in: self.req_stats.map_or(0, |s| s.bytes.load(Ordering::Relaxed)),
                bytes_out,
                peer: conn.peer,
                peer_identity: conn.identity.as_ref().map(|i| i.id.clone()),
                trace_id: self.trace_id,
                error: self.error.or((!complete).then_some("response_incomplete")),
            });
        }
    }
}

async fn handle(mut req: Request<Incoming>, conn: Arc<Conn>) -> Response<Body> {
    conn.state.in_flight.fetch_add(1, Ordering::Relaxed);
    let logging = conn.listener.access_log.enabled();
    let version = req.version();
    let mut end = RequestEnd {
        conn: conn.clone(),
        start: Instant::now(),
        wall: if logging { SystemTime::now() } else { SystemTime::UNIX_EPOCH },
        method: req.method().clone(),
        uri: logging.then(|| req.uri().clone()),
        version,
        status: 0,
        trace_id: if logging { trace_id(req.headers().get("traceparent")) } else { None },
        error: None,
        req_stats: None,
        app_conn: None,
    };
    let l = &conn.listener;

    if !conn.allowed {
        l.metrics.reject(Reject::IdentityNotAllowed);
        return local_reply(
            end,
            StatusCode::FORBIDDEN,
            "client identity not allowed\n",
            "identity_not_allowed",
        );
    }
    if req.method() == Method::CONNECT {
        return local_reply(
            end,
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not proxied here\n",
            "connect_refused",
        );
    }
    let upgrade = version == Version::HTTP_11 && wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    sanitize_request(&mut parts.headers, upgrade);
    conn.forwarding.apply(&mut parts.headers);
    if let Some(id) = &conn.identity {
        parts.headers.insert(X_FORWARDED_CLIENT_CERT.clone(), id.xfcc.clone());
        parts.headers.insert(X_CLIENT_IDENTITY.clone(), id.header.clone());
    }
    let proto = match (upgrade, l.app_http) {
        (true, _) | (false, HttpVersion::Http1) => Proto::Http1,
        (false, HttpVersion::Http2) => Proto::Http2,
        // What the app speaks: an HTTP/2 client keeps HTTP/2 when the app has it (gRPC),
        // and is translated to HTTP/1.1 when it has not.
        (false, HttpVersion::Auto) if version == Version::HTTP_2 && l.pool.speaks_h2().await => Proto::Http2,
        (false, HttpVersion::Auto) => Proto::Http1,
    };
    match proto {
        Proto::Http1 => {
            to_origin_form(&mut parts.uri, &mut parts.headers);
            parts.version = Version::HTTP_11;
        }
        Proto::Http2 => {
            to_absolute_form(&mut parts.uri, &mut parts.headers, l.config.target);
            parts.version = Version::HTTP_2;
        }
    }
    let (body, stats) = RequestBody::new(body);
    end.req_stats = stats;
    let up_req = Request::from_parts(parts, body);

    let send = async {
        if upgrade {
            Box::pin(l.pool.send_upgrade(up_req)).await.map(|r| (r, None))
        } else {
            l.pool.send(up_req, proto, &conn.sticky).await
        }
    };
    let timeout = l.config.request_timeout;
    let result =
        if timeout.is_zero() { Some(send.await) } else { tokio::time::timeout(timeout, send).await.ok() };
    let (mut resp, app_conn) = match result {
        None => {
            return local_reply(end, StatusCode::GATEWAY_TIMEOUT, "app timed out\n", "app_timeout");
        }
        Some(Err(e)) => {
            let client_body_failed =
                end.req_stats.as_ref().is_some_and(|s| s.errored.load(Ordering::Relaxed));
            if client_body_failed {
                return local_reply(end, StatusCode::BAD_REQUEST, "bad request body\n", "client_body_error");
            }
            // Debug, not warn: when the app is down this is every request; the access log's
            // `error` and the health checker's warning already say so.
            tracing::debug!(listener = %l.config.name, error = %e, "app request failed");
            return local_reply(end, StatusCode::BAD_GATEWAY, "app unavailable\n", e.kind());
        }
        Some(Ok(r)) => r,
    };
    end.app_conn = app_conn;
    end.status = resp.status().as_u16();

    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
        conn.state.upgraded.store(true, Ordering::Release);
        let app_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(client_upgrade, app_upgrade, conn.drain.clone()));
    }
    strip_hop_by_hop(resp.headers_mut(), switching);
    if version == Version::HTTP_2 {
        *resp.version_mut() = Version::HTTP_2;
    } else {
        *resp.version_mut() = Version::HTTP_11;
        if conn.drain.is_draining() && !switching {
            // Tell the client before it sends another request on a connection about to close.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    resp.map(|b| ResponseBody::stream(b, end))
}

/// A short plain-text answer made here, not by the app.
fn local_reply(
    mut end: RequestEnd,
    status: StatusCode,
    body: &'static str,
    error: &'static str,
) -> Response<Body> {
    end.status = status.as_u16();
    end.error = Some(error);
    let close = status == StatusCode::BAD_REQUEST && end.version != Version::HTTP_2;
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes()), Some(end)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Copies bytes both ways between a client and the app after a protocol switch
/// (WebSocket). Holds a drain watch so a drain waits for it, up to the drain timeout.
async fn tunnel(client: hyper::upgrade::OnUpgrade, app: hyper::upgrade::OnUpgrade, _drain: DrainWatch) {
    let (client, app) = match tokio::try_join!(client, app) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut app = TokioIo::new(app);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}
