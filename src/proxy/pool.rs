//! Connections to one upstream address (the app), HTTP/1.1 pooled and HTTP/2 shared.
//!
//! HTTP/1.1: each client connection keeps the app connection its last request used (`Sticky`),
//! so a keep-alive client reuses one app connection without touching shared state; behind
//! that, a lock-free queue of idle connections shared by the listener. The response body hands
//! the connection back when it ends. A connection the app closed while
//! idle is noticed either before sending (`ready` fails) or by hyper refusing the request
//! unsent; then the request goes out on a fresh connection, so an app's keep-alive timeout
//! racing a request is not a 502. HTTP/2: one multiplexed connection, replaced when it closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::RequestBody;

/// Idle HTTP/1.1 connections kept per upstream. Enough for the 64–256 concurrent clients of
/// a busy pod; beyond it, connections are closed after use rather than hoarded.
const MAX_IDLE: usize = 256;
/// How long the HTTP/2 probe waits for the app's PONG. A local app answers in microseconds;
/// an HTTP/1-only one fails at once; this bounds a silent one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

const H2_UNKNOWN: u8 = 0;
const H2_YES: u8 = 1;
const H2_NO: u8 = 2;

/// Idle connections older than this are closed instead of reused: below the 60 s or more
/// most servers keep idle keep-alive connections, so we rarely reuse one mid-close.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {addr}: timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("request to {addr}: {source}")]
    Send { addr: SocketAddr, source: hyper::Error },
}

impl PoolError {
    /// A short, stable name for logs and the access log's `error` field.
    pub fn kind(&self) -> &'static str {
        match self {
            PoolError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused => {
                "app_connection_refused"
            }
            PoolError::Connect { .. } | PoolError::Handshake { .. } => "app_connect_error",
            PoolError::ConnectTimeout { .. } => "app_connect_timeout",
            PoolError::Send { .. } => "app_reset",
        }
    }
}

/// Which protocol to speak to the upstream for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

struct Idle {
    conn: http1::SendRequest<RequestBody>,
    since: Instant,
}

pub struct Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Arc<ArrayQueue<Idle>>,
    h2: ArcSwapOption<http2::SendRequest<RequestBody>>,
    /// Single-flight for HTTP/2 connects: a burst of requests opens one connection, not many.
    h2_connect: tokio::sync::Mutex<()>,
    /// Whether the upstream speaks HTTP/2 with prior knowledge (`H2_*`), once probed.
    h2_support: AtomicU8,
}

/// An HTTP/1.1 connection to the upstream.
pub type H1Conn = http1::SendRequest<RequestBody>;

/// The app connection one client connection is using between its requests. Dropping it (the
/// client connection closed) puts the app connection in the shared idle queue.
pub struct Sticky {
    slot: ArrayQueue<H1Conn>,
    pool: Arc<Pool>,
}

impl Sticky {
    pub fn new(pool: Arc<Pool>) -> Self {
        Sticky { slot: ArrayQueue::new(1), pool }
    }

    /// Gives a connection back after a request that went through whole (both bodies);
    /// otherwise just drop it and hyper closes it.
    pub fn give_back(&self, conn: H1Conn) {
        if conn.is_closed() {
            return;
        }
        // Occupied when an HTTP/2 client had several requests in flight: the extra
        // connection goes to the shared queue.
        if let Err(conn) = self.slot.push(conn) {
            self.pool.put_idle(conn);
        }
    }
}

impl Drop for Sticky {
    fn drop(&mut self) {
        if let Some(conn) = self.slot.pop() {
            self.pool.put_idle(conn);
        }
    }
}

impl Pool {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Pool {
            addr,
            connect_timeout,
            idle: Arc::new(ArrayQueue::new(MAX_IDLE)),
            h2: ArcSwapOption::empty(),
            h2_connect: tokio::sync::Mutex::new(()),
            h2_support: AtomicU8::new(H2_UNKNOWN),
        }
    }

    /// Whether the upstream speaks HTTP/2 (for `http: auto`). Learned once, by a PING on an
    /// HTTP/2 connection: an HTTP/2 server answers with a PONG, an HTTP/1-only one fails the
    /// preface. Nothing reaches the app's handlers. While the app cannot be reached the
    /// answer is "yes", so the request fails as it would have anyway and the probe runs again.
    pub async fn speaks_h2(&self) -> bool {
        match self.h2_support.load(Ordering::Relaxed) {
            H2_YES => return true,
            H2_NO => return false,
            _ => {}
        }
        Box::pin(self.probe()).await
    }

    async fn probe(&self) -> bool {
        let _one = self.h2_connect.lock().await;
        if self.h2_support.load(Ordering::Relaxed) == H2_UNKNOWN {
            let Ok(io) = self.connect().await else { return true };
            let verdict = match tokio::time::timeout(PROBE_TIMEOUT, probe_h2(io.into_inner())).await {
                Ok(true) => H2_YES,
                _ => H2_NO,
            };
            tracing::info!(
                app = %self.addr,
                http2 = verdict == H2_YES,
                "probed the app for HTTP/2 (app.http: auto)"
            );
            self.h2_support.store(verdict, Ordering::Relaxed);
        }
        self.h2_support.load(Ordering::Relaxed) == H2_YES
    }

    fn put_idle(&self, conn: H1Conn) {
        let _ = self.idle.push(Idle { conn, since: Instant::now() });
    }

    /// Sends `req` and returns the response head; for HTTP/1.1 also the connection, to be
    /// given back to `sticky` when the response body ends.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        proto: Proto,
        sticky: &Sticky,
    ) -> Result<(Response<Incoming>, Option<H1Conn>), PoolError> {
        match proto {
            Proto::Http1 => self.send_h1(req, sticky).await.map(|(r, c)| (r, Some(c))),
            Proto::Http2 => self.send_h2(req).await.map(|r| (r, None)),
        }
    }

    async fn send_h1(
        &self,
        mut req: Request<RequestBody>,
        sticky: &Sticky,
    ) -> Result<(Response<Incoming>, H1Conn), PoolError> {
        loop {
            let mut reusable = None;
            if let Some(mut c) = sticky.slot.pop()
                && c.ready().await.is_ok()
            {
                reusable = Some(c);
            }
            if reusable.is_none() {
                reusable = self.take_idle().await;
            }
            let (mut conn, reused) = match reusable {
                Some(c) => (c, true),
                // Boxed: the connect path is rare, and inline it would make every request's future
                // (moved on each poll) several times larger.
                None => (Box::pin(self.connect_h1()).await?, false),
            };
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection died under us. Fresh ones are
                    // not retried, so this loop ends.
                    Some(back) if reused => req = back,
                    _ => {
                        return Err(PoolError::Send { addr: self.addr, source: e.into_error() });
                    }
                },
            }
        }
    }

    /// An idle connection that can take a request now, skipping closed and stale ones.
    async fn take_idle(&self) -> Option<H1Conn> {
        while let Some(mut idle) = self.idle.pop() {
            if idle.since.elapsed() > IDLE_TIMEOUT || idle.conn.is_closed() {
                continue;
            }
            // Ready at once, or within a poll of the connection task finishing the last
            // response; an error means the app closed it.
            if idle.conn.ready().await.is_ok() {
                return Some(idle.conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>, PoolError> {
        let addr = self.addr;
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(PoolError::Connect { addr, source }),
            Err(_) => {
                return Err(PoolError::ConnectTimeout { addr, after: self.connect_timeout });
            }
        };
        // Requests are small writes that must leave now, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(&self) -> Result<H1Conn, PoolError> {
        let io = self.connect().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| PoolError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app connection ended");
            }
        });
        Ok(sender)
    }

    /// A dedicated HTTP/1.1 connection that may switch protocols (WebSocket); never pooled.
    pub async fn send_upgrade(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, PoolError> {
        let io = self.connect().await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| PoolError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "app upgrade connection ended");
            }
        });
        sender.send_request(req).await.map_err(|source| PoolError::Send { addr: self.addr, source })
    }

    async fn send_h2(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, PoolError> {
        let mut sender = match self.h2.load().as_deref() {
            Some(s) if !s.is_closed() => s.clone(),
            _ => Box::pin(self.h2_sender()).await?,
        };
        sender.send_request(req).await.map_err(|source| PoolError::Send { addr: self.addr, source })
    }

    async fn h2_sender(&self) -> Result<http2::SendRequest<RequestBody>, PoolError> {
        if let Some(s) = self.h2.load().as_deref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let _one = self.h2_connect.lock().await;
        // Someone else may have connected while we waited.
        if let Some(s) = self.h2.load().as_deref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let io = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Notice a dead app connection within ~40 s even when no request is in flight.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|source| PoolError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app h2 connection ended");
            }
        });
        self.h2.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }
}

/// True when the peer completes an HTTP/2 handshake and answers a PING.
async fn probe_h2(io: TcpStream) -> bool {
    let Ok((_send, mut conn)) = h2::client::handshake(io).await else { return false };
    let Some(mut ping_pong) = conn.ping_pong() else { return false };
    tokio::select! {
        pong = ping_pong.ping(h2::Ping::opaque()) => pong.is_ok(),
        // The connection future only ends early when the peer breaks the protocol.
        _ = conn => false,
    }
}
