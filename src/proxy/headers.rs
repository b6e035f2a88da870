//! Header rules for a proxy hop: hop-by-hop headers removed (RFC 9110 §7.6.1), forwarding
//! headers added, and request targets rewritten between HTTP/1 and HTTP/2 forms.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub static X_CLIENT_IDENTITY: HeaderName = HeaderName::from_static("x-client-identity");

/// Removes the headers that describe one connection, not the message: those named in
/// `Connection`, and the fixed list of RFC 9110 §7.6.1. `TE: trailers` survives because gRPC
/// needs it end to end (and HTTP/2 allows exactly that value). With `upgrade` the
/// `Connection: upgrade` / `Upgrade` pair is kept for the next hop.
///
/// Runs on every request and response: HTTP/1.1 servers (nginx among them) answer every
/// request with `Connection: keep-alive`, so the common case is "one Connection header naming
/// nothing else". One pass over the names finds which hop-by-hop headers are present; only
/// those are removed (each `remove` hashes), and `Connection` tokens are matched in place
/// instead of being turned into owned header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let present = headers.keys().fold(0u8, |acc, name| acc | hop_by_hop_bit(name));
    if present == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // Cheap to clone (shared bytes), and it frees the map for the removals below.
        let first = headers.get(header::CONNECTION).cloned();
        let rest: Vec<HeaderValue> = if headers.get_all(header::CONNECTION).iter().nth(1).is_some() {
            headers.get_all(header::CONNECTION).iter().skip(1).cloned().collect()
        } else {
            Vec::new() // no allocation: a second Connection line is rare
        };
        for value in first.iter().chain(rest.iter()) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                let fixed = token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("close")
                    || (upgrade && token.eq_ignore_ascii_case("upgrade"));
                if !fixed && !token.is_empty() {
                    // `&str` names are looked up without allocating; an invalid one matches nothing.
                    headers.remove(token);
                }
            }
        }
        if !upgrade {
            headers.remove(header::CONNECTION);
        }
    }
    if present & HOP_KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & HOP_PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & HOP_TRAILER != 0 {
        headers.remove(header::TRAILER);
    }
    if present & HOP_UPGRADE != 0 && !upgrade {
        headers.remove(header::UPGRADE);
    }
    if present & HOP_TE != 0
        && let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
}

const HOP_CONNECTION: u8 = 1;
const HOP_KEEP_ALIVE: u8 = 1 << 1;
const HOP_PROXY_CONNECTION: u8 = 1 << 2;
const HOP_TRANSFER_ENCODING: u8 = 1 << 3;
const HOP_TRAILER: u8 = 1 << 4;
const HOP_UPGRADE: u8 = 1 << 5;
const HOP_TE: u8 = 1 << 6;

/// Which hop-by-hop header `name` is, as a bit (0 for an end-to-end header). Standard names
/// compare as enum tags; `keep-alive` and `proxy-connection` as short byte strings.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        HOP_CONNECTION
    } else if name == header::TRANSFER_ENCODING {
        HOP_TRANSFER_ENCODING
    } else if name == header::TE {
        HOP_TE
    } else if name == header::TRAILER {
        HOP_TRAILER
    } else if name == header::UPGRADE {
        HOP_UPGRADE
    } else if name == KEEP_ALIVE {
        HOP_KEEP_ALIVE
    } else if name == PROXY_CONNECTION {
        HOP_PROXY_CONNECTION
    } else {
        0
    }
}

/// Prepares a client's request headers for the app: hop-by-hop headers out (see
/// `strip_hop_by_hop`), `Expect` out (100-continue is answered by hyper on this hop when the
/// body is first read, which is when the app's connection is ready for it), and any
/// `x-forwarded-client-cert` / `x-client-identity` the client sent out, because only this hop
/// may say who the client is.
pub fn sanitize_request(headers: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    let claims =
        |n: &HeaderName| n == header::EXPECT || n == X_FORWARDED_CLIENT_CERT || n == X_CLIENT_IDENTITY;
    if headers.keys().any(claims) {
        headers.remove(header::EXPECT);
        headers.remove(&X_FORWARDED_CLIENT_CERT);
        headers.remove(&X_CLIENT_IDENTITY);
    }
}

/// True for an HTTP/1.1 request asking to switch protocols (WebSocket): `Connection`
/// lists `upgrade` and an `Upgrade` header names the protocol. `Upgrade: h2c` is not one:
/// RFC 9113 §3.1 retired it and hyper does not serve it, so the request is answered in
/// HTTP/1.1 and the pair (with `HTTP2-Settings`) is removed as hop-by-hop, never sent on.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c"))));
    headers.contains_key(header::UPGRADE)
        && !h2c
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Forwarding header values for one client connection, computed once per connection.
pub struct Forwarding {
    for_value: HeaderValue,
    forwarded_value: HeaderValue,
    proto: HeaderValue,
}

impl Forwarding {
    pub fn new(peer: std::net::IpAddr, tls: bool) -> Self {
        let proto = if tls { "https" } else { "http" };
        // RFC 7239 §6: IPv6 addresses are bracketed and the whole value quoted.
        let node = match peer {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        let to_value = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("unknown"));
        Forwarding {
            for_value: to_value(peer.to_string()),
            forwarded_value: to_value(format!("for={node};proto={proto}")),
            proto: HeaderValue::from_static(proto),
        }
    }

    /// Appends this hop to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto`
    /// to the scheme the client used here.
    pub fn apply(&self, headers: &mut HeaderMap) {
        append_list(headers, &X_FORWARDED_FOR, &self.for_value);
        append_list(headers, &FORWARDED, &self.forwarded_value);
        headers.insert(X_FORWARDED_PROTO.clone(), self.proto.clone());
    }
}

/// Adds `value` to a comma-separated list header, folding earlier lines into one.
fn append_list(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(v) => {
            v.insert(value.clone());
        }
        header::Entry::Occupied(mut o) => {
            let mut joined = Vec::with_capacity(64);
            for v in o.iter() {
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                o.insert(v);
            }
        }
    }
}

/// Rewrites a request target for an HTTP/1.1 hop: origin-form (`/path?q`), with `Host`
/// set from the HTTP/2 `:authority` when the client spoke HTTP/2. A request with neither
/// (HTTP/1.0 allows that) gets the target's own authority: the hop is HTTP/1.1, where a
/// request without `Host` must be refused (RFC 9112 §3.2), and nginx does refuse it.
pub fn to_origin_form(uri: &mut Uri, headers: &mut HeaderMap, fallback: &crate::net::Addr) {
    if !headers.contains_key(header::HOST) {
        let authority = match uri.authority() {
            Some(auth) => HeaderValue::from_str(auth.as_str()).ok(),
            // Rare (HTTP/1.0 without Host): format only then.
            None => HeaderValue::try_from(fallback.authority()).ok(),
        };
        if let Some(v) = authority {
            headers.insert(header::HOST, v);
        }
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        let pq = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *uri = Uri::from(pq);
    }
}

/// Rewrites a request target for an HTTP/2 hop: absolute form, authority taken from `Host`
/// (which HTTP/2 carries as `:authority` instead, RFC 9113 §8.3.1).
pub fn to_absolute_form(uri: &mut Uri, headers: &mut HeaderMap, fallback: &crate::net::Addr, scheme: Scheme) {
    if uri.scheme().is_some() && uri.authority().is_some() {
        headers.remove(header::HOST);
        return;
    }
    let authority = headers
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        // An HTTP/1.1 request without Host (legal only in HTTP/1.0) is rare: format only then.
        .or_else(|| Authority::try_from(fallback.authority()).ok());
    let mut parts = std::mem::take(uri).into_parts();
    parts.scheme = Some(scheme);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(u) = Uri::from_parts(parts) {
        *uri = u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_with_them() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("upgrade", "foo"),
            ("proxy-connection", "close"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn connection_tokens_in_several_lines_and_cases() {
        let mut h = map(&[
            ("connection", "Keep-Alive"),
            ("connection", "close, X-A ,, bad name"),
            ("x-a", "1"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        let mut h = map(&[("connection", "keep-alive"), ("content-length", "12")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn client_claims_of_identity_are_removed() {
        let mut h = map(&[
            ("x-client-identity", "admin"),
            ("x-forwarded-client-cert", "URI=x"),
            ("expect", "100-continue"),
            ("x-kept", "1"),
        ]);
        sanitize_request(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key("te"));
    }

    #[test]
    fn websocket_upgrade_keeps_its_pair() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "Upgrade");
    }

    #[test]
    fn h2c_upgrade_is_not_an_upgrade_and_goes_no_further() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(!wants_upgrade(&h));
        sanitize_request(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn forwarding_appends() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        Forwarding::new("::1".parse().unwrap(), false).apply(&mut h);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, ::1");
        assert_eq!(h.get("forwarded").unwrap(), "for=\"[::1]\";proto=http");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    }

    #[test]
    fn target_forms() {
        let mut uri: Uri = "http://example.com/a?b".parse().unwrap();
        let mut h = HeaderMap::new();
        let unix = crate::net::Addr::parse_unix("unix:/run/app.sock").unwrap().unwrap();
        to_origin_form(&mut uri, &mut h, &unix);
        assert_eq!(uri, "/a?b");
        assert_eq!(h.get("host").unwrap(), "example.com");
        to_absolute_form(&mut uri, &mut h, &unix, Scheme::HTTP);
        assert_eq!(uri.to_string(), "http://example.com/a?b");
        assert!(!h.contains_key("host"));
        // No Host at all (HTTP/1.0): the target's own authority, `localhost` for a socket.
        let mut uri: Uri = "/x".parse().unwrap();
        to_absolute_form(&mut uri, &mut h, &unix, Scheme::HTTP);
        assert_eq!(uri.to_string(), "http://localhost/x");
        // The same without Host towards an HTTP/1.1 app: Host is added.
        let mut h = HeaderMap::new();
        to_origin_form(&mut uri, &mut h, &unix);
        assert_eq!(h.get("host").unwrap(), "localhost");
        let mut uri: Uri = "/y".parse().unwrap();
        let mut h = HeaderMap::new();
        to_origin_form(&mut uri, &mut h, &std::net::SocketAddr::from(([127, 0, 0, 1], 8080)).into());
        assert_eq!(
            (uri.to_string().as_str(), h.get("host").unwrap().to_str().unwrap()),
            ("/y", "127.0.0.1:8080")
        );
    }
}
