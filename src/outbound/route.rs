//! Which upstream an outbound request goes to, and its target rewritten for it.
//!
//! A listener with one upstream and no `hosts` sends everything there. Listeners that share
//! an address route by the request's host: the absolute-form target's authority (what a
//! client sends when `HTTP_PROXY` points at the sidecar) or the `Host` header, matched
//! without its port against each upstream's `hosts`. Any other host is refused (403): the
//! sidecar is never an open proxy.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderValue, Uri, Version, header};

use super::Upstream;
use crate::inbound::ListenerMetrics;

/// An upstream and the metric handles its requests count under.
#[derive(Clone)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<ListenerMetrics>,
}

/// One outbound listener's upstreams.
#[derive(Default)]
pub struct Routes {
    /// The one upstream of a listener that routes every host.
    all: Option<Route>,
    /// Lower-case host names, without port.
    by_host: HashMap<String, Route>,
}

impl Routes {
    /// `hosts` empty: the route takes every request of the listener.
    pub fn add(&mut self, hosts: &[String], route: Route) {
        if hosts.is_empty() {
            self.all = Some(route);
        } else {
            for h in hosts {
                self.by_host.insert(h.to_ascii_lowercase(), route.clone());
            }
        }
    }

    /// The listener's one upstream, for `tcp` listeners (which cannot route by host).
    pub fn only(&self) -> Option<&Route> {
        self.all.as_ref()
    }

    /// The route for a request, or the host it named when none matches.
    pub fn pick(&self, parts: &http::request::Parts) -> Result<&Route, String> {
        if let Some(all) = &self.all {
            return Ok(all);
        }
        let host = request_host(parts).unwrap_or_default();
        // Names are kept lower-case; most requests already are, and need no copy to look up.
        let found = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&host.to_ascii_lowercase())
        } else {
            self.by_host.get(host)
        };
        found.ok_or_else(|| host.to_ascii_lowercase())
    }
}

/// The request's host as sent, without port, user info or IPv6 brackets; not allocated (it
/// is read on every outbound request, so it works on bytes rather than `str` searches).
fn request_host(parts: &http::request::Parts) -> Option<&str> {
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => parts.headers.get(header::HOST)?.as_bytes(),
    };
    // What `HeaderValue::to_str` accepts (visible ASCII, space, tab): else no host.
    if !authority.iter().all(|&b| (b' '..0x7f).contains(&b) || b == b'\t') {
        return None;
    }
    // A few bytes each: plain scans beat `memchr`'s set-up here (callgrind).
    let last = |b: u8, s: &[u8]| s.iter().rposition(|&c| c == b);
    let authority = last(b'@', authority).map_or(authority, |at| &authority[at + 1..]);
    let host = match authority.strip_prefix(b"[") {
        Some(v6) => &v6[..v6.iter().position(|&c| c == b']')?],
        None => last(b':', authority).map_or(authority, |colon| &authority[..colon]),
    };
    std::str::from_utf8(host).ok()
}

/// Whether `host` names this machine: `localhost` or a loopback address.
fn is_local(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The target for the upstream's HTTP/1.1: origin-form, with `Host` the absolute-form
/// target's authority when there was one, and the upstream's name when the app addressed the
/// sidecar itself (`localhost:15001`) rather than a service.
pub fn rewrite_target(parts: &mut http::request::Parts, up: &Upstream) {
    if let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
        parts.headers.insert(header::HOST, a);
    }
    if request_host(parts).is_none_or(is_local) {
        parts.headers.insert(header::HOST, up.authority().clone());
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(target: &str, host: Option<&str>) -> Option<String> {
        let mut req = http::Request::builder().uri(target);
        if let Some(h) = host {
            req = req.header(header::HOST, h);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        request_host(&parts).map(str::to_owned)
    }

    #[test]
    fn the_host_is_found_without_port_user_info_or_brackets() {
        assert_eq!(host_of("/", Some("orders:8080")).as_deref(), Some("orders"));
        assert_eq!(host_of("/", Some("Orders")).as_deref(), Some("Orders"));
        assert_eq!(host_of("/", Some("[::1]:15001")).as_deref(), Some("::1"));
        assert_eq!(host_of("http://user:pw@orders:80/x", Some("other")).as_deref(), Some("orders"));
        assert_eq!(host_of("http://[fe80::1]/", None).as_deref(), Some("fe80::1"));
        assert_eq!(host_of("/", None), None);
        assert!(is_local("127.0.0.1") && is_local("::1") && is_local("LocalHost"));
        assert!(!is_local("orders") && !is_local("10.0.0.1") && !is_local("127.example"));
    }
}
