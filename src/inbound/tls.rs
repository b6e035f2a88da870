//! TLS termination for inbound connections: the handshake (bounded, classified, counted)
//! and the authorization of the client's identity.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::ListenerCtx;
use crate::tls::{PeerIdentity, ServerTls};

/// A finished handshake: the stream and, with mTLS, who the client is.
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    pub identity: Option<Arc<PeerIdentity>>,
    /// The client negotiated HTTP/2 by ALPN.
    pub h2: bool,
}

/// Runs the handshake within the listener's handshake timeout. `None` when it failed; the
/// failure is counted in `sidecar_tls_handshakes_total{result}` and logged at debug.
pub async fn accept(
    stream: TcpStream,
    tls: &ServerTls,
    ctx: &ListenerCtx,
    peer: SocketAddr,
) -> Option<Accepted> {
    let timeout = tls.files().handshake_timeout;
    let result = tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await;
    let stream = match result {
        Err(_) => {
            ctx.metrics.handshake("timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
        Ok(Err(e)) => {
            let why = classify(&e);
            ctx.metrics.handshake(why);
            tracing::debug!(%peer, error = %e, result = why, "TLS handshake failed");
            return None;
        }
        Ok(Ok(s)) => s,
    };
    ctx.metrics.handshake("success");
    let conn = stream.get_ref().1;
    let identity =
        conn.peer_certificates().and_then(|c| c.first()).and_then(PeerIdentity::from_leaf).map(Arc::new);
    let h2 = conn.alpn_protocol() == Some(b"h2");
    Some(Accepted { stream, identity, h2 })
}

/// True when `allowed_identities` is empty or names this client.
pub fn allowed(tls: &ServerTls, identity: Option<&PeerIdentity>) -> bool {
    let list = &tls.files().allowed_identities;
    list.is_empty() || identity.is_some_and(|i| list.iter().any(|a| **a == *i.id))
}

/// A short label for why a handshake failed.
fn classify(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => "aborted",
            _ => "error",
        };
    };
    match tls {
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => "not_tls",
        Error::PeerIncompatible(_) => "incompatible",
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "client_cert_expired"
        }
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "client_cert_not_yet_valid",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(_) => "bad_client_cert",
        _ => "error",
    }
}
