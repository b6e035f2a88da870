//! An endpoint's one shared HTTP/2 connection, and the probe that tells whether an endpoint
//! speaks HTTP/2 at all (`http: auto`): a PING in cleartext, ALPN over TLS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{Connector, PoolError};
use crate::net::Stream;
use crate::proxy::body::RequestBody;
use crate::proxy::{H2_CONNECTION_WINDOW, H2_MAX_SEND_BUF, H2_STREAM_WINDOW};

/// How long the probe waits for the peer's PONG. A local app answers in microseconds; an
/// HTTP/1-only one fails at once; this bounds a silent one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

pub type H2Sender = http2::SendRequest<RequestBody>;

#[derive(Default)]
pub struct Shared {
    conn: ArcSwapOption<H2Sender>,
    /// Single flight for connects and the probe: a burst of requests opens one connection.
    connecting: tokio::sync::Mutex<()>,
    /// Whether the peer speaks HTTP/2 with prior knowledge (`YES`/`NO`), once probed.
    support: AtomicU8,
}

impl Shared {
    /// The open connection, if there is one.
    pub fn current(&self) -> Option<H2Sender> {
        self.conn.load().as_deref().filter(|s| !s.is_closed()).cloned()
    }

    pub fn known(&self) -> Option<bool> {
        match self.support.load(Ordering::Relaxed) {
            YES => Some(true),
            NO => Some(false),
            _ => None,
        }
    }

    /// Opens the connection, or waits for the request that is opening it.
    pub async fn connect(&self, connector: &Connector, timeout: Duration) -> Result<H2Sender, PoolError> {
        let _one = self.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let addr = connector.addr.clone();
        let io = connector.connect(timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Notice a dead connection within ~40 s even when no request is in flight.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .handshake(io)
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        self.conn.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    /// Learns whether the peer speaks HTTP/2: an HTTP/2 server answers a PING with a PONG, an
    /// HTTP/1-only one fails the preface.
    pub async fn probe(&self, connector: &Connector, timeout: Duration) -> bool {
        let _one = self.connecting.lock().await;
        if self.support.load(Ordering::Relaxed) == UNKNOWN {
            let Ok(io) = connector.connect(timeout).await else { return true };
            let verdict = match io.into_inner() {
                // Over TLS the server said it in ALPN; offered `h2` first, it takes it if it can.
                Stream::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => YES,
                Stream::Tls(_) => NO,
                plain => match tokio::time::timeout(PROBE_TIMEOUT, ping(plain)).await {
                    Ok(true) => YES,
                    _ => NO,
                },
            };
            tracing::info!(upstream = %connector.addr, http2 = verdict == YES, "probed for HTTP/2 (http: auto)");
            self.support.store(verdict, Ordering::Relaxed);
        }
        self.support.load(Ordering::Relaxed) == YES
    }
}

/// True when the peer completes an HTTP/2 handshake and answers a PING.
async fn ping(io: Stream) -> bool {
    let Ok((_send, mut conn)) = h2::client::handshake(io).await else { return false };
    let Some(mut ping_pong) = conn.ping_pong() else { return false };
    tokio::select! {
        pong = ping_pong.ping(h2::Ping::opaque()) => pong.is_ok(),
        // The connection future only ends early when the peer breaks the protocol.
        _ = conn => false,
    }
}
