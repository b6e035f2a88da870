//! TLS termination for inbound connections: the handshake (bounded, classified, counted)
//! and the authorization of the client's identity.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::ListenerCtx;
use super::metrics::Handshake;
use crate::tls::{PeerIdentity, ServerTls};

/// A finished handshake: the stream and, with mTLS, who the client is.
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    pub identity: Option<Arc<PeerIdentity>>,
    /// The client negotiated HTTP/2 by ALPN.
    pub h2: bool,
}

/// Runs the handshake within the listener's handshake timeout. `None` when it failed; the
/// failure is counted in `sidecar_tls_handshakes_total{result}` and logged at debug. The
/// client's identity joins the connection's span.
pub async fn accept(stream: TcpStream, tls: &ServerTls, ctx: &ListenerCtx) -> Option<Accepted> {
    let timeout = tls.files().handshake_timeout;
    let result = tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await;
    let stream = match result {
        Err(_) => {
            ctx.metrics.handshake(Handshake::Timeout);
            tracing::debug!("TLS handshake timed out");
            return None;
        }
        Ok(Err(e)) => {
            let why = classify(&e);
            ctx.metrics.handshake(why);
            tracing::debug!(error = %e, result = why.as_str(), "TLS handshake failed");
            return None;
        }
        Ok(Ok(s)) => s,
    };
    ctx.metrics.handshake(Handshake::Success);
    let conn = stream.get_ref().1;
    let identity =
        conn.peer_certificates().and_then(|c| c.first()).and_then(PeerIdentity::from_leaf).map(Arc::new);
    if let Some(id) = &identity {
        tracing::Span::current().record("identity", &*id.id);
    }
    let h2 = conn.alpn_protocol() == Some(b"h2");
    Some(Accepted { stream, identity, h2 })
}

/// True when `allowed_identities` is empty or names this client.
pub fn allowed(tls: &ServerTls, identity: Option<&PeerIdentity>) -> bool {
    let list = &tls.files().allowed_identities;
    list.is_empty() || identity.is_some_and(|i| list.iter().any(|a| **a == *i.id))
}

/// Why a handshake failed.
fn classify(e: &std::io::Error) -> Handshake {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => Handshake::Aborted,
            _ => Handshake::Error,
        };
    };
    match tls {
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => Handshake::NotTls,
        Error::PeerIncompatible(_) => Handshake::Incompatible,
        Error::NoCertificatesPresented => Handshake::NoClientCert,
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            Handshake::ClientCertExpired
        }
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => Handshake::ClientCertNotYetValid,
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => Handshake::UnknownCa,
        Error::InvalidCertificate(_) => Handshake::BadClientCert,
        _ => Handshake::Error,
    }
}
