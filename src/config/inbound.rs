//! The `inbound` section: listeners for traffic coming into the pod, with their limits,
//! timeouts and TLS files.
//!
//! Not responsible for binding or serving (`crate::inbound`), nor for reading the TLS files
//! (`crate::tls` checks them after validation).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Ctx, Scalar, duration_str, parse_size};
use crate::net::Addr;

// Defaults are the contract's (INTERFACE.md) unless a comment says otherwise.

/// Most traffic into a pod is HTTP; `tcp` is the opt-in for opaque bytes.
pub const DEFAULT_PROTOCOL: Protocol = Protocol::Http;
/// Close to Envoy's 60 KiB `max_request_headers_kb`: room for large cookies and tokens, while
/// a client still cannot make one connection hold more than this of request head.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Cuts slowloris clients (a head sent a byte at a time) while leaving a slow network room.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Frees the connection slot and buffers of a client that keeps a connection open and silent.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Per listener; bounds memory and file descriptors when a client opens connections unchecked.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Envoy's route timeout. Not in the contract; README documents it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The contract's outbound `connect_timeout`; the target is usually in the same pod, where a
/// connect that has not finished in 1s is not coming.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// README's documented default (not in the contract): bounds how long a client that opens a
/// TLS connection and stalls can hold a connection slot.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawInbound {
    name: Option<String>,
    listen: Option<String>,
    protocol: Option<Protocol>,
    target: Option<String>,
    tls: Option<RawTls>,
    limits: RawLimits,
    request_timeout: Option<Scalar>,
    connect_timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    allowed_identities: Vec<String>,
    handshake_timeout: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    max_header_bytes: Option<Scalar>,
    header_read_timeout: Option<Scalar>,
    idle_timeout: Option<Scalar>,
    max_connections: Option<u64>,
}

/// `admin_listen` and `app_address` come from their sections: a listener may not take the
/// admin server's address, and its target defaults to the app.
pub(super) fn validate(
    raw: Vec<RawInbound>,
    cx: &mut Ctx,
    admin_listen: SocketAddr,
    app_address: &Addr,
) -> Vec<InboundConfig> {
    let mut inbound: Vec<InboundConfig> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("inbound[{i}]");
        let taken: Vec<_> = inbound.iter().map(|l| (l.name.as_str(), l.listen)).collect();
        let name = validate_name(&at, i, r.name, cx, &taken);
        let listen = validate_listen(&at, r.listen.as_deref(), cx, &taken, admin_listen);
        let target = match r.target.as_deref() {
            Some(t) => cx.upstream(&format!("{at}.target"), t),
            None => app_address.clone(),
        };
        let tls = r.tls.map(|t| validate_tls(&at, t, cx));
        let limits = validate_limits(&at, r.limits, cx);
        inbound.push(InboundConfig {
            name,
            listen,
            protocol: r.protocol.unwrap_or(DEFAULT_PROTOCOL),
            target,
            limits,
            tls,
            request_timeout: cx.duration(
                &format!("{at}.request_timeout"),
                r.request_timeout.as_ref(),
                DEFAULT_REQUEST_TIMEOUT,
            ),
            connect_timeout: cx.positive_duration(
                &format!("{at}.connect_timeout"),
                r.connect_timeout.as_ref(),
                DEFAULT_CONNECT_TIMEOUT,
            ),
        });
    }
    inbound
}

/// `earlier`: the (name, address) of the listeners validated so far, in either direction,
/// whose names and addresses this one may not reuse.
pub(super) fn validate_name(
    at: &str,
    i: usize,
    raw: Option<String>,
    cx: &mut Ctx,
    earlier: &[(&str, SocketAddr)],
) -> String {
    let path = format!("{at}.name");
    let name = match raw {
        Some(n) if valid_name(&n) => n,
        Some(n) => {
            cx.bad(&path, format!("`{n}` is not a valid name: use letters, digits, `-` and `_`"));
            n
        }
        None => {
            cx.bad(&path, "missing: every listener needs a name (it labels metrics and logs)");
            format!("listener-{i}")
        }
    };
    if earlier.iter().any(|(n, _)| *n == name) {
        cx.bad(&path, format!("`{name}` is used by another listener"));
    }
    name
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub(super) fn validate_listen(
    at: &str,
    raw: Option<&str>,
    cx: &mut Ctx,
    earlier: &[(&str, SocketAddr)],
    admin_listen: SocketAddr,
) -> SocketAddr {
    let path = format!("{at}.listen");
    let listen = match raw {
        Some(l) => cx.addr(&path, l),
        None => {
            cx.bad(&path, "missing: the address to listen on, like `0.0.0.0:15006`");
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    // Port 0 is the placeholder of an address already reported as bad, or a port the OS
    // picks at bind time: neither can clash, and comparing would add confusing problems.
    if listen.port() != 0 {
        if earlier.iter().any(|(_, a)| *a == listen) {
            cx.bad(&path, format!("{listen} is used by another listener"));
        }
        if listen == admin_listen {
            cx.bad(&path, format!("{listen} is the admin server's address"));
        }
    }
    listen
}

fn validate_tls(at: &str, t: RawTls, cx: &mut Ctx) -> InboundTls {
    let mut file = |field: &str, v: Option<PathBuf>| {
        v.unwrap_or_else(|| {
            cx.bad(format!("{at}.tls.{field}"), "missing: a PEM file path");
            PathBuf::new()
        })
    };
    let cert = file("cert", t.cert);
    let key = file("key", t.key);
    let identities = format!("{at}.tls.allowed_identities");
    if !t.allowed_identities.is_empty() && t.client_ca.is_none() {
        cx.bad(&identities, "needs `client_ca`: without client certificates no identity is known");
    }
    if t.allowed_identities.iter().any(|i| i.trim().is_empty()) {
        cx.bad(&identities, "an identity is empty");
    }
    InboundTls {
        cert,
        key,
        client_ca: t.client_ca,
        allowed_identities: t.allowed_identities,
        handshake_timeout: cx.positive_duration(
            &format!("{at}.tls.handshake_timeout"),
            t.handshake_timeout.as_ref(),
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        ),
    }
}

pub(super) fn validate_limits(at: &str, lim: RawLimits, cx: &mut Ctx) -> Limits {
    let header_path = format!("{at}.limits.max_header_bytes");
    let max_header_bytes = match &lim.max_header_bytes {
        None => DEFAULT_MAX_HEADER_BYTES,
        Some(s) => match parse_size(s) {
            Ok(n) if (1024..=1024 * 1024).contains(&n) => n as usize,
            Ok(n) => {
                cx.bad(&header_path, format!("{n} bytes is outside 1KiB..1MiB"));
                DEFAULT_MAX_HEADER_BYTES
            }
            Err(m) => {
                cx.bad(&header_path, m);
                DEFAULT_MAX_HEADER_BYTES
            }
        },
    };
    Limits {
        max_header_bytes,
        header_read_timeout: cx.positive_duration(
            &format!("{at}.limits.header_read_timeout"),
            lim.header_read_timeout.as_ref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        ),
        idle_timeout: cx.positive_duration(
            &format!("{at}.limits.idle_timeout"),
            lim.idle_timeout.as_ref(),
            DEFAULT_IDLE_TIMEOUT,
        ),
        max_connections: match lim.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(0) => {
                cx.bad(format!("{at}.limits.max_connections"), "must be at least 1");
                1
            }
            Some(n) => n.min(u32::MAX as u64) as usize,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundConfig {
    /// Labels the listener's metrics and logs; unique. Required.
    pub name: String,
    /// Required; unique, and not the admin server's address.
    pub listen: SocketAddr,
    /// Default [`DEFAULT_PROTOCOL`], `http`.
    pub protocol: Protocol,
    /// Where connections go: TCP or `unix:/path`. Default `app.address`.
    pub target: Addr,
    pub limits: Limits,
    /// Terminate TLS here. `None`: plain text.
    pub tls: Option<InboundTls>,
    /// Longest wait for the app's response headers before answering 504. Default
    /// [`DEFAULT_REQUEST_TIMEOUT`], 15s; 0s turns it off. Streaming bodies are not cut by it.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    /// Longest wait for a TCP connect to the target. Default [`DEFAULT_CONNECT_TIMEOUT`], 1s.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundTls {
    /// PEM certificate chain, leaf first. Reloaded when the file changes.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Only its path is ever shown.
    pub key: PathBuf,
    /// PEM CA bundle. Set: clients must present a certificate chaining to it (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Client identities (SPIFFE IDs or DNS names) let through; empty: any verified client.
    pub allowed_identities: Vec<String>,
    /// Longest a TLS handshake may take. Default [`DEFAULT_TLS_HANDSHAKE_TIMEOUT`], 10s.
    #[serde(with = "duration_str")]
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Largest request head (request line and headers) accepted, in bytes; more gets 431.
    /// Default [`DEFAULT_MAX_HEADER_BYTES`], 64KiB; 1KiB..1MiB.
    pub max_header_bytes: usize,
    /// How long a client may take to send a request head; slower ones are cut. Default
    /// [`DEFAULT_HEADER_READ_TIMEOUT`], 10s.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving this long is closed.
    /// Default [`DEFAULT_IDLE_TIMEOUT`], 60s.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Open connections on this listener; more are accepted and closed at once. Default
    /// [`DEFAULT_MAX_CONNECTIONS`], 10000.
    pub max_connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse_str, smallest};

    #[test]
    fn defaults_are_what_the_smallest_config_gets() {
        let c = smallest();
        let l = &c.inbound[0];
        assert_eq!(l.protocol, DEFAULT_PROTOCOL);
        assert_eq!(l.target, c.app.address);
        assert_eq!(l.tls, None);
        assert_eq!(l.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(l.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            l.limits,
            Limits {
                max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
                header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                max_connections: DEFAULT_MAX_CONNECTIONS,
            }
        );
    }

    /// Inbound TLS is built: a listener with both files is accepted as written (the files
    /// themselves are read later, by `tls::check_files`).
    #[test]
    fn listener_with_tls_cert_and_key_parses() {
        let c = parse_str("inbound: [{name: a, listen: 127.0.0.1:1, tls: {cert: a, key: b}}]\n").unwrap();
        let tls = InboundTls {
            cert: PathBuf::from("a"),
            key: PathBuf::from("b"),
            client_ca: None,
            allowed_identities: vec![],
            handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        };
        assert_eq!(c.inbound[0].tls, Some(tls));
    }

    #[test]
    fn tls_without_a_key_is_refused_at_the_key() {
        let err = parse_str("inbound: [{name: a, listen: 127.0.0.1:1, tls: {cert: a}}]\n").unwrap_err();
        assert_eq!(
            err.problems,
            [crate::config::Problem {
                path: "inbound[0].tls.key".to_owned(),
                message: "missing: a PEM file path".to_owned()
            }]
        );
    }

    #[test]
    fn duplicate_names_and_addresses() {
        let err =
            parse_str("inbound:\n - {name: a, listen: 127.0.0.1:1}\n - {name: a, listen: 127.0.0.1:1}\n")
                .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
    }
}
