//! The inbound HTTP server: one client connection from first byte to close, and each
//! request's trip to the app and back.
//!
//! Life of a connection: detect HTTP/2 prior knowledge by the preface, else HTTP/1.1 behind
//! the framing guard → hyper serves it, supervised for header and idle timeouts and drain →
//! each request: hop-by-hop headers out, forwarding headers in, target rewritten for the
//! app's protocol → the app's pool → the response streamed back, and when its body ends,
//! metrics, the access-log record, the span, and the app connection back to the pool
//! (`end`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::ListenerCtx;
use super::guard::{ConnState, Guard};
use super::io::{DetectError, Detected, ServerIo, detect};
use super::metrics::Reject;
use super::sticky::Sticky;
use super::supervise::{Ended, supervise};
use crate::config::{HttpVersion, Limits};
use crate::drain::DrainWatch;
use crate::outbound::route::{self, Route};
use crate::proxy::body::{RequestBody, ResponseBody, Upstream};
use crate::proxy::error::ProxyError;
use crate::proxy::headers::{
    Forwarding, X_CLIENT_IDENTITY, X_FORWARDED_CLIENT_CERT, sanitize_request, strip_hop_by_hop,
    to_absolute_form, to_origin_form, wants_upgrade,
};
use crate::proxy::pool::Proto;
use crate::proxy::{H2_CONNECTION_WINDOW, H2_MAX_SEND_BUF, H2_STREAM_WINDOW};
use crate::tls::PeerIdentity;
use end::RequestEnd;

mod end;

type Body = ResponseBody<RequestEnd>;

/// Largest buffer hyper keeps per client HTTP/1 connection, each way, unless the header limit
/// needs more (the whole head must fit). hyper's default of ~400 KiB let one slow reader
/// hold over a megabyte with the app side's (issue 9, bug 9).
const H1_MAX_BUF: usize = 16 * 1024;
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
    h2: http2::Builder<SpanExecutor>,
}

impl Builders {
    pub fn new(limits: &Limits) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // The guard times request heads; hyper's timer would also run between
            // keep-alive requests and close idle connections early.
            .header_read_timeout(None)
            .max_header_size(limits.max_header_bytes)
            .max_buf_size(H1_MAX_BUF.max(limits.max_header_bytes + 1024))
            .keep_alive(true);
        let mut h2 = http2::Builder::new(SpanExecutor);
        h2.timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .max_local_error_reset_streams(MAX_LOCAL_RESETS)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_MAX_SEND_BUF);
        Builders { h1, h2 }
    }
}

/// Runs the tasks hyper spawns (one per HTTP/2 stream) inside the connection's span, so
/// their log lines carry the listener and the peer like the connection's own.
#[derive(Clone, Copy)]
pub struct SpanExecutor;

impl<F> hyper::rt::Executor<F> for SpanExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.in_current_span());
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

impl Conn {
    fn new(
        listener: Arc<ListenerCtx>,
        peer: SocketAddr,
        drain: DrainWatch,
        tls: Option<(Option<Arc<PeerIdentity>>, bool)>,
    ) -> Self {
        let (identity, allowed) = tls.clone().unwrap_or((None, true));
        Conn {
            listener,
            peer,
            state: ConnState::new(),
            forwarding: Forwarding::new(peer.ip(), tls.is_some()),
            drain,
            identity,
            allowed,
            sticky: Sticky::new(),
        }
    }
}

pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<ListenerCtx>, drain: DrainWatch) {
    let _ = stream.set_nodelay(true);
    let Some(tls) = ctx.tls.clone() else {
        return serve_plain(stream, peer, ctx, drain).await;
    };
    let Some(accepted) = super::tls::accept(stream, &tls, &ctx).await else {
        return;
    };
    let allowed = super::tls::allowed(&tls, accepted.identity.as_deref());
    let protocol = if accepted.h2 { Detected::Http2 } else { Detected::Http1 };
    let conn = Conn::new(ctx, peer, drain, Some((accepted.identity, allowed)));
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
            tracing::debug!(error = %e, "client connection failed");
            return;
        }
    };
    serve_http(stream, detected, Conn::new(ctx, peer, drain, None)).await;
}

/// Serves HTTP on an established (plain or TLS) connection until it closes.
async fn serve_http<S>(stream: S, detected: Detected, conn: Conn)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state = conn.state.clone();
    let ctx = conn.listener.clone();
    let drain = conn.drain.clone();
    let limits = &ctx.config.limits;
    let conn = Arc::new(conn);
    let svc = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        // Disabled (and free) unless the filter asks for debug: requests are the hot path.
        let span = tracing::debug_span!("request", method = %req.method(), path = %req.uri().path());
        async move { Ok::<_, Infallible>(handle(req, conn).await) }.instrument(span)
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
            tracing::debug!(error = %e, "client connection ended with an error");
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

/// A request ready to go to the app.
struct Prepared {
    req: Request<RequestBody>,
    proto: Proto,
    /// The client side of a protocol switch (WebSocket), resolved after the app's 101.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Outbound: the upstream it goes to instead of the app.
    route: Option<Route>,
}

/// A request's trip: prepare it for the app, send it, and shape the answer for the client.
/// Whatever fails on the way becomes a local reply through `ProxyError::rescue`.
async fn handle(req: Request<Incoming>, conn: Arc<Conn>) -> Response<Body> {
    let awaiting = AwaitingHead::new(&conn.state);
    let mut end = RequestEnd::new(&req, &conn);
    let prepared = match prepare(req, &conn, &mut end).await {
        Ok(p) => p,
        Err(e) => return local_reply(end, &e),
    };
    let client_upgrade = prepared.client_upgrade.is_some();
    let upstream = prepared.route.map(|r| r.upstream);
    let sent = send(prepared.req, prepared.proto, client_upgrade, upstream, &conn, &end).await;
    drop(awaiting);
    match sent {
        Ok(resp) => respond(resp, prepared.client_upgrade, &conn, end),
        Err(e) => local_reply(end, &e),
    }
}

/// Counts a request as waiting for its response head until dropped, however `handle` ends
/// (a client that resets its stream drops the future midway).
struct AwaitingHead<'a>(&'a ConnState);

impl<'a> AwaitingHead<'a> {
    fn new(state: &'a ConnState) -> Self {
        state.awaiting_head.fetch_add(1, Ordering::Relaxed);
        AwaitingHead(state)
    }
}

impl Drop for AwaitingHead<'_> {
    fn drop(&mut self) {
        self.0.awaiting_head.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Checks the request may pass, then rewrites it for the app: hop-by-hop headers out,
/// forwarding and identity headers in, the target in the form the app's protocol needs.
async fn prepare(
    mut req: Request<Incoming>,
    conn: &Conn,
    end: &mut RequestEnd,
) -> Result<Prepared, ProxyError> {
    let l = &conn.listener;
    if !conn.allowed {
        l.metrics.reject(Reject::IdentityNotAllowed);
        return Err(ProxyError::IdentityNotAllowed);
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectRefused);
    }
    let version = req.version();
    let upgrade = version == Version::HTTP_11 && wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    sanitize_request(&mut parts.headers, upgrade);
    if let Some(t) = &end.trace {
        t.span.propagate(t.incoming, &mut parts.headers);
    }
    if let Some(routes) = &l.routes {
        // The app's own call: no forwarding headers (the peer is the app itself).
        let route = routes.pick(&parts).map_err(|host| {
            l.metrics.reject(Reject::UnknownHost);
            ProxyError::UnknownHost { host }
        })?;
        route::rewrite_target(&mut parts, &route.upstream);
        end.metrics = route.metrics.clone();
        let (body, stats) = RequestBody::new(body);
        end.req_stats = stats;
        let req = Request::from_parts(parts, body);
        return Ok(Prepared { req, proto: Proto::Http1, client_upgrade: None, route: Some(route.clone()) });
    }
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
        (false, HttpVersion::Auto)
            if version == Version::HTTP_2 && l.app_h2.speaks_h2(l.config.connect_timeout).await =>
        {
            Proto::Http2
        }
        (false, HttpVersion::Auto) => Proto::Http1,
    };
    match proto {
        Proto::Http1 => {
            to_origin_form(&mut parts.uri, &mut parts.headers, &l.config.target);
            parts.version = Version::HTTP_11;
        }
        Proto::Http2 => {
            to_absolute_form(&mut parts.uri, &mut parts.headers, &l.config.target, http::uri::Scheme::HTTP);
            parts.version = Version::HTTP_2;
        }
    }
    let (body, stats) = RequestBody::new(body);
    end.req_stats = stats;
    Ok(Prepared { req: Request::from_parts(parts, body), proto, client_upgrade, route: None })
}

/// Sends the request to the app and waits for its response head, within `request_timeout`.
async fn send(
    req: Request<RequestBody>,
    proto: Proto,
    upgrade: bool,
    upstream: Option<Arc<crate::outbound::Upstream>>,
    conn: &Conn,
    end: &RequestEnd,
) -> Result<Response<Upstream>, ProxyError> {
    let l = &conn.listener;
    let connect_timeout = l.config.connect_timeout;
    let send = async {
        if let Some(up) = &upstream {
            // Boxed: the call's future holds every try's; inline, it would make this future
            // (moved into the timeout, then on every poll of hyper's dispatch) several
            // times larger (memmove was 11 % of an outbound request's instructions).
            let call = Box::pin(up.call(req, conn.sticky.take(), end.start));
            return call.await.map_err(ProxyError::Outbound);
        }
        let sent = if upgrade {
            Box::pin(l.app_h1.send_upgrade(req, connect_timeout)).await.map(|r| r.map(Upstream::Hyper))
        } else if proto == Proto::Http2 {
            l.app_h2.send_h2(req, connect_timeout).await.map(|r| r.map(Upstream::Hyper))
        } else {
            l.app_h1.send_h1(req, conn.sticky.take(), connect_timeout).await.map(|r| r.map(Upstream::H1))
        };
        sent.map_err(ProxyError::Upstream)
    };
    let timeout = upstream.as_ref().map_or(l.config.request_timeout, |up| up.config().request_timeout);
    let result = if timeout.is_zero() {
        send.await
    } else {
        let timed_out = |_| match &upstream {
            Some(up) => ProxyError::OutboundTimeout { upstream: up.name.clone(), after: timeout },
            None => ProxyError::Timeout,
        };
        tokio::time::timeout(timeout, send).await.map_err(timed_out)?
    };
    result.map_err(|e| {
        if end.req_stats.as_ref().is_some_and(|s| s.errored.load(Ordering::Relaxed)) {
            return ProxyError::ClientBody;
        }
        // Debug, not warn: when the app or an upstream is down this is every request; the
        // access log's `error`, the health checker and the ejection log already say so.
        tracing::debug!(error = %e, "request failed");
        e
    })
}

/// Shapes the app's response for the client: the tunnel after a protocol switch,
/// hop-by-hop headers out, `Connection: close` during a drain, the body wrapped so the
/// request's end is noticed.
fn respond(
    mut resp: Response<Upstream>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    conn: &Conn,
    mut end: RequestEnd,
) -> Response<Body> {
    end.status = resp.status().as_u16();
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
        conn.state.upgraded.store(true, Ordering::Release);
        let app_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(tunnel(client_upgrade, app_upgrade, conn.drain.clone()).in_current_span());
    }
    strip_hop_by_hop(resp.headers_mut(), switching);
    if end.version == Version::HTTP_2 {
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
fn local_reply(mut end: RequestEnd, error: &ProxyError) -> Response<Body> {
    let rescue = error.rescue();
    end.status = rescue.status.as_u16();
    end.error = Some(rescue.error);
    let close = rescue.status == StatusCode::BAD_REQUEST && end.version != Version::HTTP_2;
    let body = match rescue.body {
        std::borrow::Cow::Borrowed(b) => Bytes::from_static(b.as_bytes()),
        std::borrow::Cow::Owned(b) => Bytes::from(b),
    };
    let mut resp = Response::new(ResponseBody::full(body, Some(end)));
    *resp.status_mut() = rescue.status;
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
