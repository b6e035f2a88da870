//! Errors of a proxied request mapped to what the client gets, in one place: the status, a
//! short plain body and the stable name the access log's `error` field carries (as
//! linkerd2-proxy's "rescue" does). Nothing here formats per request: bodies and names
//! are static.

use std::borrow::Cow;

use http::StatusCode;

use crate::outbound::CallError;

use super::connect::PoolError;

/// Why the proxy answered a request itself instead of passing on the upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's verified identity is not in the listener's `allowed_identities`.
    #[error("client identity not allowed")]
    IdentityNotAllowed,
    /// `CONNECT` asks for a tunnel somewhere else; a sidecar only reaches its own app.
    #[error("CONNECT is not proxied")]
    ConnectRefused,
    /// No response head within `request_timeout`.
    #[error("upstream timed out")]
    Timeout,
    /// The client's request body broke off (reset stream, bad chunk) while being sent on.
    #[error("client request body failed")]
    ClientBody,
    #[error(transparent)]
    Upstream(#[from] PoolError),
    /// An outbound request for a host no upstream of the listener answers to.
    #[error("no upstream is configured for host `{host}` on this listener")]
    UnknownHost { host: String },
    /// An outbound call that got no usable answer from its upstream.
    #[error(transparent)]
    Outbound(#[from] crate::outbound::CallError),
    /// An outbound call's `request_timeout` expired, retries included.
    #[error("upstream {upstream}: request_timeout ({after:?}) expired")]
    OutboundTimeout { upstream: std::sync::Arc<str>, after: std::time::Duration },
}

/// A local answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescue {
    pub status: StatusCode,
    /// Static, but for outbound answers that name the upstream and what went wrong.
    pub body: Cow<'static, str>,
    /// The access log's `error` value.
    pub error: &'static str,
}

impl ProxyError {
    pub fn rescue(&self) -> Rescue {
        let (status, body, error) = match self {
            ProxyError::IdentityNotAllowed => {
                (StatusCode::FORBIDDEN, "client identity not allowed\n", "identity_not_allowed")
            }
            ProxyError::ConnectRefused => {
                (StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied here\n", "connect_refused")
            }
            ProxyError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "app timed out\n", "app_timeout"),
            ProxyError::ClientBody => (StatusCode::BAD_REQUEST, "bad request body\n", "client_body_error"),
            ProxyError::Upstream(e) => (StatusCode::BAD_GATEWAY, "app unavailable\n", e.kind()),
            ProxyError::Outbound(e) => return outbound(e),
            ProxyError::UnknownHost { .. } => {
                return Rescue {
                    status: StatusCode::FORBIDDEN,
                    body: format!("{self}\n").into(),
                    error: "unknown_host",
                };
            }
            ProxyError::OutboundTimeout { .. } => {
                return Rescue {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    body: format!("{self}\n").into(),
                    error: "upstream_timeout",
                };
            }
        };
        Rescue { status, body: body.into(), error }
    }
}

/// Outbound answers name the upstream and say what went wrong, for the app's logs.
fn outbound(e: &CallError) -> Rescue {
    let (status, error) = match e {
        CallError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable"),
        CallError::PerTryTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        // A timeout is a 504 whichever one expired; the body says which.
        CallError::Failed { source: PoolError::ConnectTimeout { .. }, .. } => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_connect_timeout")
        }
        CallError::Failed { source, .. } => (StatusCode::BAD_GATEWAY, outbound_kind(source.kind())),
        CallError::ClientBody(_) => (StatusCode::BAD_REQUEST, "client_body_error"),
    };
    Rescue { status, body: format!("{e}\n").into(), error }
}

/// The outbound name of a pool error: `upstream_` where inbound says `app_`.
fn outbound_kind(inbound: &'static str) -> &'static str {
    match inbound {
        "app_connection_refused" => "upstream_connection_refused",
        "app_connect_timeout" => "upstream_connect_timeout",
        "app_invalid_response" => "upstream_invalid_response",
        "app_reset" => "upstream_reset",
        "app_tls_error" => "upstream_tls_error",
        "app_identity_mismatch" => "upstream_identity_mismatch",
        _ => "upstream_connect_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_answer() {
        let refused = PoolError::Connect {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 1)).into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let cases = [
            (ProxyError::IdentityNotAllowed, 403, "identity_not_allowed"),
            (ProxyError::ConnectRefused, 405, "connect_refused"),
            (ProxyError::Timeout, 504, "app_timeout"),
            (ProxyError::ClientBody, 400, "client_body_error"),
            (ProxyError::Upstream(refused), 502, "app_connection_refused"),
        ];
        for (e, status, name) in cases {
            let r = e.rescue();
            assert_eq!((r.status.as_u16(), r.error), (status, name), "{e}");
            assert!(r.body.ends_with('\n'));
        }
    }
}
