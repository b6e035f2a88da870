//! A cache of connections per endpoint, for both directions: inbound has one endpoint (the
//! app), outbound one per address its discovery finds.
//!
//! An endpoint is keyed by (address, TLS server name and identity, protocol). HTTP/1.1
//! connections (`proxy::h1`) are lent to one request at a time: the response body holds the
//! connection and gives it back only when both bodies went through whole; idle ones wait in
//! a lock-free queue and are reaped on a timer. Each endpoint caps its
//! connections and its dials in flight: past the cap a request waits for a connection another
//! request returns instead of opening its own. HTTP/2 shares one multiplexed connection per
//! endpoint, replaced when it closes. The pool does not choose endpoints (balancing is the
//! caller's) and does not know which direction it serves.

mod multiplex;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::sync::Notify;

use super::body::RequestBody;
pub use super::connect::{Connector, PoolError};
pub use super::h1::H1Conn;
use super::h1::{self, Outgoing};
use crate::drain::DrainWatch;
use crate::net::Addr;
use crate::tls::client::ClientTls;

/// Idle HTTP/1.1 connections kept per endpoint. Enough for the 64–256 concurrent clients of
/// a busy pod; beyond it, connections are closed after use rather than hoarded.
const MAX_IDLE: usize = 256;
/// Open HTTP/1.1 connections per endpoint (Envoy's default `max_connections` circuit
/// breaker). Requests past it wait for a returned connection, bounded by their timeout.
const MAX_CONNECTIONS: usize = 1024;
/// Dials in flight per endpoint: a burst of requests (20 HTTP/2 streams at once) must not
/// become a burst of SYNs against an app with a small accept backlog; the requests beyond it
/// wait for a connection another one finishes with, or for a dial slot.
const MAX_DIALS: usize = 16;
/// Idle connections older than this are closed instead of reused: below the 60 s or more
/// most servers keep idle keep-alive connections, so we rarely reuse one mid-close.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// How often idle connections are checked for age and for the peer having closed them.
const REAP_INTERVAL: Duration = Duration::from_secs(10);
/// Largest buffer hyper keeps on an upgrade (WebSocket) connection before the switch, as
/// the lean client's read size (`h1::READ_SIZE`) bounds pooled ones (issue 9, bug 9).
const H1_MAX_BUF: usize = 16 * 1024;

/// Which protocol to speak to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// What a TLS connection to the endpoint would be checked against (outbound origination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsKey {
    pub server_name: Arc<str>,
    pub identity: Option<Arc<str>>,
}

/// What makes two connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: Addr,
    pub tls: Option<TlsKey>,
    pub proto: Proto,
}

/// Every endpoint connections were made to, shared by whoever dials them.
pub struct Pool {
    // Locked only to find or create an endpoint (once per listener or per discovered
    // address), never per request.
    endpoints: Mutex<HashMap<EndpointKey, Arc<Endpoint>>>,
}

/// Connections to one endpoint.
pub struct Endpoint {
    key: EndpointKey,
    connector: Connector,
    /// Live HTTP/1.1 connections, idle or lent; decremented when a connection's task ends.
    open: AtomicUsize,
    dialing: AtomicUsize,
    idle: ArrayQueue<Idle>,
    /// Signalled when a connection is returned, closed, or a dial ends: a waiter retries.
    returned: Notify,
    h2: multiplex::Shared,
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

/// A slot in an endpoint's connection count, held by the connection.
pub(super) struct Slot(Arc<Endpoint>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.returned.notify_one();
    }
}

/// A dial in flight; ends (and wakes a waiter) however the dial ends.
struct Dialing<'a>(&'a Endpoint);

impl Drop for Dialing<'_> {
    fn drop(&mut self) {
        self.0.dialing.fetch_sub(1, Ordering::Relaxed);
        self.0.returned.notify_one();
    }
}

impl Pool {
    pub fn new() -> Arc<Self> {
        Arc::new(Pool { endpoints: Mutex::new(HashMap::new()) })
    }

    /// The endpoint for `key`, created on first use.
    pub fn endpoint(&self, key: EndpointKey) -> Arc<Endpoint> {
        self.endpoint_with(key, None)
    }

    /// The endpoint for `key`, created on first use with `tls` to originate TLS (the key's
    /// `tls` says which server name and identity it checks).
    pub fn endpoint_with(&self, key: EndpointKey, tls: Option<Arc<ClientTls>>) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_insert_with(|| Endpoint::new(key, tls)).clone()
    }

    /// Forgets endpoints `keep` rejects; their idle connections close when the last request
    /// using them ends.
    pub fn retain(&self, keep: impl Fn(&EndpointKey) -> bool) {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| keep(k));
    }

    fn all(&self) -> Vec<Arc<Endpoint>> {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// Closes idle connections that are too old or that the peer closed, every
    /// `REAP_INTERVAL`, until the pool is gone or the drain begins.
    pub async fn reap(pool: Weak<Pool>, mut drain: DrainWatch) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = drain.signaled() => return,
            }
            let Some(pool) = pool.upgrade() else { return };
            for endpoint in pool.all() {
                endpoint.reap(IDLE_TIMEOUT);
            }
        }
    }
}

impl Endpoint {
    fn new(key: EndpointKey, tls: Option<Arc<ClientTls>>) -> Arc<Self> {
        Arc::new(Endpoint {
            connector: Connector::with_tls(key.addr.clone(), tls),
            key,
            open: AtomicUsize::new(0),
            dialing: AtomicUsize::new(0),
            idle: ArrayQueue::new(MAX_IDLE),
            returned: Notify::new(),
            h2: multiplex::Shared::default(),
        })
    }

    pub fn key(&self) -> &EndpointKey {
        &self.key
    }

    pub fn addr(&self) -> &Addr {
        &self.key.addr
    }

    /// Open HTTP/1.1 connections (idle and lent).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Idle connections waiting for a request.
    pub fn idle_connections(&self) -> usize {
        self.idle.len()
    }

    /// Puts a connection that can take another request in the idle queue.
    pub fn put_idle(&self, conn: H1Conn) {
        if !conn.is_usable() {
            return;
        }
        // Full: close it rather than hoard (MAX_IDLE).
        if self.idle.push(Idle { conn, since: Instant::now() }).is_ok() {
            self.returned.notify_one();
        }
    }

    /// Sends `req` on an HTTP/1.1 connection: `preferred` (the caller's last one) when it
    /// can take a request, else an idle one, else a new one once the endpoint has room. A
    /// request a reused connection could not even send (the peer closed it while idle) goes
    /// out on another, so a keep-alive timeout racing a request is not an error.
    ///
    /// Not `async` itself: it returns `send_encoded`'s future as it is, so the request's
    /// future does not nest one more state machine (measured: 165 instructions a request).
    pub fn send_h1<'a>(
        self: &'a Arc<Self>,
        req: Request<RequestBody>,
        preferred: Option<H1Conn>,
        connect_timeout: Duration,
    ) -> impl Future<Output = Result<Response<h1::Body>, PoolError>> + Send + 'a {
        self.send_encoded(Outgoing::new(req), preferred, connect_timeout)
    }

    /// `send_h1` for a request already encoded (outbound: from the head its call keeps).
    pub async fn send_encoded(
        self: &Arc<Self>,
        mut out: Outgoing,
        mut preferred: Option<H1Conn>,
        connect_timeout: Duration,
    ) -> Result<Response<h1::Body>, PoolError> {
        loop {
            let ready = match preferred.take() {
                Some(c) if c.is_usable() => Some(c),
                _ => self.take_idle(),
            };
            let (conn, reused) = match ready {
                Some(c) => (c, true),
                // Boxed: the connect path is rare, and inline it would make every request's
                // future (moved on each poll) several times larger.
                None => Box::pin(self.checkout_new(connect_timeout)).await?,
            };
            match conn.send(out).await {
                Ok(resp) => return Ok(resp),
                // Never written: the pooled connection died under us. A fresh one is not
                // tried twice, so this loop ends.
                Err(h1::Failed { unsent: Some(back), .. }) if reused => out = back,
                Err(h1::Failed { error, unsent }) => {
                    let sent = unsent.is_none();
                    return Err(PoolError::Exchange { addr: self.key.addr.clone(), source: error, sent });
                }
            }
        }
    }

    /// An idle connection that can take a request now, skipping closed and stale ones.
    fn take_idle(&self) -> Option<H1Conn> {
        while let Some(idle) = self.idle.pop() {
            if idle.since.elapsed() <= IDLE_TIMEOUT && idle.conn.is_usable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// A connection for a request that found none idle: a new one when the endpoint has room
    /// for another connection and another dial, else the first one returned.
    async fn checkout_new(self: &Arc<Self>, connect_timeout: Duration) -> Result<(H1Conn, bool), PoolError> {
        loop {
            let returned = self.returned.notified();
            let mut returned = std::pin::pin!(returned);
            // Registered before looking, so a return between the look and the wait is seen.
            returned.as_mut().enable();
            if let Some(c) = self.take_idle() {
                return Ok((c, true));
            }
            if let Some((slot, dialing)) = self.reserve() {
                return self.dial_h1(slot, dialing, connect_timeout).await.map(|c| (c, false));
            }
            returned.await;
        }
    }

    /// Room for one more connection and one more dial, or nothing. A failed reservation
    /// is rolled back without waking anyone: a wake-up here would wake the caller itself,
    /// which would then spin without ever yielding.
    fn reserve(self: &Arc<Self>) -> Option<(Slot, Dialing<'_>)> {
        let take = |n: &AtomicUsize, max: usize| {
            n.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| (v < max).then_some(v + 1)).is_ok()
        };
        if !take(&self.dialing, MAX_DIALS) {
            return None;
        }
        if !take(&self.open, MAX_CONNECTIONS) {
            self.dialing.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some((Slot(self.clone()), Dialing(self)))
    }

    async fn dial_h1(
        self: &Arc<Self>,
        slot: Slot,
        dialing: Dialing<'_>,
        connect_timeout: Duration,
    ) -> Result<H1Conn, PoolError> {
        let io = self.connector.connect(connect_timeout).await?;
        drop(dialing);
        Ok(H1Conn::new(io.into_inner(), self.clone(), slot))
    }

    /// A new connection of its own, not pooled (outbound `tcp` listeners).
    pub async fn connect(&self, connect_timeout: Duration) -> Result<crate::net::Stream, PoolError> {
        self.connector.connect(connect_timeout).await.map(|io| io.into_inner())
    }

    /// Closes idle connections older than `max_age` or closed by the peer.
    fn reap(&self, max_age: Duration) {
        // Pop what is there now and push back the good ones, in order; connections returned
        // meanwhile simply join the queue.
        for _ in 0..self.idle.len() {
            let Some(idle) = self.idle.pop() else { break };
            if idle.since.elapsed() <= max_age && idle.conn.is_usable() {
                let _ = self.idle.push(idle);
            }
        }
    }

    /// A dedicated HTTP/1.1 connection that may switch protocols (WebSocket); never pooled
    /// and not counted against the cap: a tunnel is bounded by the listener's connections.
    pub async fn send_upgrade(
        &self,
        req: Request<RequestBody>,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, PoolError> {
        let addr = &self.key.addr;
        let io = self.connector.connect(connect_timeout).await?;
        let (mut sender, conn) = http1::Builder::new()
            .max_buf_size(H1_MAX_BUF)
            .handshake(io)
            .await
            .map_err(|source| PoolError::Handshake { addr: addr.clone(), source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        sender.send_request(req).await.map_err(|source| PoolError::Send {
            addr: addr.clone(),
            source,
            sent: true,
        })
    }

    /// Sends `req` on the endpoint's shared HTTP/2 connection, connecting it if needed.
    pub async fn send_h2(
        &self,
        req: Request<RequestBody>,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut sender = match self.h2.current() {
            Some(s) => s,
            None => Box::pin(self.h2.connect(&self.connector, connect_timeout)).await?,
        };
        // h2 hands an unsent request back as a "refused stream" error: the connection was
        // going away (GOAWAY) before the stream opened.
        sender.send_request(req).await.map_err(|source| {
            let sent = !source.is_canceled();
            PoolError::Send { addr: self.key.addr.clone(), source, sent }
        })
    }

    /// Whether the endpoint speaks HTTP/2 with prior knowledge (for `http: auto`), learned
    /// once by a PING: nothing reaches the peer's handlers. While it cannot be reached the
    /// answer is "yes", so the request fails as it would have anyway and the probe runs
    /// again next time.
    pub async fn speaks_h2(&self, connect_timeout: Duration) -> bool {
        match self.h2.known() {
            Some(v) => v,
            None => Box::pin(self.h2.probe(&self.connector, connect_timeout)).await,
        }
    }
}

#[cfg(test)]
mod tests;
