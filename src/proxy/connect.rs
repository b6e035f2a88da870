//! Dialling an endpoint: a TCP connect bounded by a timeout, retried when it failed before
//! anything was sent, and the errors of the whole trip to an upstream, each knowing whether
//! a retry is safe. TLS origination (outbound) plugs in here; the pool only sees a stream.

use std::time::Duration;

use std::sync::Arc;

use hyper_util::rt::TokioIo;

use crate::tls::client::ClientTls;

use crate::net::{Addr, Stream};

/// Dial attempts per checkout. A dial that failed sent nothing, so trying again is always
/// safe; three attempts cover a SYN dropped by a full accept backlog (the kernel resends
/// it after 1 s, which is exactly where a 1 s connect timeout fires: issue 9, bug 7) and an
/// app that is restarting.
const CONNECT_ATTEMPTS: u32 = 3;
/// Pause before the second attempt, doubled for the third, each jittered to ½–1½ times
/// itself: long enough for a small accept queue to drain, short enough that an app that is
/// down is reported within ~100 ms. The jitter matters more than the length: a burst of
/// dials that lost their SYNs to a full backlog all time out together, and retried in the
/// same millisecond they fill the backlog again (seen: 1 request in 8 failed its three
/// attempts in the backlog-5 test with a fixed 10/20 ms pause).
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: Addr, source: std::io::Error },
    #[error("connect to {addr}: connect_timeout ({after:?}) expired")]
    ConnectTimeout { addr: Addr, after: Duration },
    #[error("handshake with {addr}: {source}")]
    Handshake { addr: Addr, source: hyper::Error },
    #[error("request to {addr}: {source}")]
    Send { addr: Addr, source: hyper::Error, sent: bool },
    /// The TLS handshake with an upstream failed (outbound `upstream.tls`): nothing was sent.
    #[error("TLS with {addr}: {source}")]
    Tls { addr: Addr, source: std::io::Error },
    /// An HTTP/1.1 exchange on a pooled connection (`proxy::h1`).
    #[error("request to {addr}: {source}")]
    Exchange { addr: Addr, source: super::h1::Error, sent: bool },
}

impl PoolError {
    /// True when the request was never written, so sending it elsewhere (or again) cannot
    /// repeat a side effect. Decided where the error is made: a connect or handshake failure
    /// sent nothing; a send failure knows whether hyper gave the request back unsent.
    pub fn is_retryable(&self) -> bool {
        match self {
            PoolError::Connect { .. }
            | PoolError::ConnectTimeout { .. }
            | PoolError::Handshake { .. }
            | PoolError::Tls { .. } => true,
            PoolError::Send { sent, .. } | PoolError::Exchange { sent, .. } => !sent,
        }
    }

    /// A short, stable name for logs and the access log's `error` field. The `app_` prefix is
    /// the inbound direction's name for its upstream (the access-log values are public).
    pub fn kind(&self) -> &'static str {
        match self {
            PoolError::Connect { source, .. } if refused(source) => "app_connection_refused",
            PoolError::Connect { .. } | PoolError::Handshake { .. } => "app_connect_error",
            PoolError::ConnectTimeout { .. } => "app_connect_timeout",
            PoolError::Tls { source, .. } if crate::tls::client::is_identity_mismatch(source) => {
                "app_identity_mismatch"
            }
            PoolError::Tls { .. } => "app_tls_error",
            PoolError::Send { .. } => "app_reset",
            PoolError::Exchange { source, .. } => match source {
                super::h1::Error::Response(_) | super::h1::Error::Chunk(_) => "app_invalid_response",
                _ => "app_reset",
            },
        }
    }
}

/// Nobody listens there: a refused TCP connect, or a Unix socket path with no file behind
/// it (an app that has not started yet, or is restarting, removes and re-creates it).
fn refused(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound)
}

/// Makes connections to one address, TCP or a Unix socket, with TLS on top when the
/// upstream asks for it.
#[derive(Clone)]
pub struct Connector {
    pub addr: Addr,
    tls: Option<Arc<ClientTls>>,
}

impl Connector {
    pub fn new(addr: impl Into<Addr>) -> Self {
        Connector { addr: addr.into(), tls: None }
    }

    /// Connections that originate TLS with `tls` (`None`: plain).
    pub fn with_tls(addr: impl Into<Addr>, tls: Option<Arc<ClientTls>>) -> Self {
        Connector { addr: addr.into(), tls }
    }

    /// One connected stream, within `timeout` per attempt, retrying failures that sent
    /// nothing. The last error is returned when every attempt failed.
    pub async fn connect(&self, timeout: Duration) -> Result<TokioIo<Stream>, PoolError> {
        let mut attempt = 1;
        loop {
            match self.connect_once(timeout).await {
                Ok(io) => return Ok(io),
                Err(e) if attempt < CONNECT_ATTEMPTS && retry_dial(&e) => {
                    tracing::debug!(error = %e, attempt, "connect failed; trying again");
                    tokio::time::sleep(jittered(RETRY_BACKOFF * (1 << (attempt - 1)))).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One connect, and the TLS handshake when configured, both within `timeout`.
    async fn connect_once(&self, timeout: Duration) -> Result<TokioIo<Stream>, PoolError> {
        let addr = || self.addr.clone();
        let dial = async {
            let stream =
                self.addr.connect().await.map_err(|source| PoolError::Connect { addr: addr(), source })?;
            match (&self.tls, stream) {
                (Some(tls), Stream::Tcp(tcp)) => {
                    let (connector, name) = tls.connector();
                    let tls = connector.connect(name, tcp).await;
                    Ok(Stream::Tls(Box::new(tls.map_err(|source| PoolError::Tls { addr: addr(), source })?)))
                }
                (_, stream) => Ok(stream),
            }
        };
        match tokio::time::timeout(timeout, dial).await {
            Ok(r) => r.map(TokioIo::new),
            Err(_) => Err(PoolError::ConnectTimeout { addr: addr(), after: timeout }),
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5). Seeded by std's per-instance random hasher
/// keys: no RNG crate for a pause that only has to differ between concurrent dials.
pub(crate) fn jittered(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    d.mul_f64(0.5 + (r % 1024) as f64 / 1024.0)
}

/// Whether another dial may help: lost SYNs, a refused or reset connect (an app restarting
/// or with a full backlog), a Unix socket not there yet or with a full backlog (`EAGAIN`).
/// Local resource errors (no ports, no file descriptors) are not retried: a second attempt
/// would fail the same way.
fn retry_dial(e: &PoolError) -> bool {
    use std::io::ErrorKind::*;
    match e {
        PoolError::ConnectTimeout { .. } => true,
        PoolError::Connect { source, .. } => {
            refused(source)
                || matches!(source.kind(), ConnectionReset | ConnectionAborted | TimedOut | WouldBlock)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_dial_is_retried_then_reported() {
        // Bind then drop: the port is (almost certainly) closed now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let started = std::time::Instant::now();
        let err = Connector::new(addr).connect(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.kind(), "app_connection_refused");
        assert!(err.is_retryable());
        // Two pauses: 25 ms and 50 ms, each at least halved by the jitter.
        assert!(started.elapsed() >= Duration::from_millis(37), "{:?}", started.elapsed());
    }

    #[test]
    fn retry_pauses_are_jittered_within_half_and_one_and_a_half() {
        let pauses: Vec<_> = (0..64).map(|_| jittered(Duration::from_millis(100))).collect();
        assert!(pauses.iter().all(|p| *p >= Duration::from_millis(50) && *p < Duration::from_millis(150)));
        let distinct: std::collections::HashSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 16, "not jittered: {pauses:?}");
    }

    #[tokio::test]
    async fn a_listening_peer_is_reached() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let io = Connector::new(addr).connect(Duration::from_secs(1)).await.unwrap();
        let Stream::Tcp(s) = io.inner() else { panic!("a TCP address gives a TCP stream") };
        assert_eq!(s.peer_addr().unwrap(), addr);
    }
}
