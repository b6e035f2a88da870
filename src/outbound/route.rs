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
        let host = request_host(parts).unwrap_or_default().to_ascii_lowercase();
        self.by_host.get(&host).ok_or(host)
    }
}

/// The request's host as sent, without port or IPv6 brackets; not allocated (it is read on
/// every outbound request).
fn request_host(parts: &http::request::Parts) -> Option<&str> {
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts.headers.get(header::HOST)?.to_str().ok()?,
    };
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    Some(host.rsplit_once('@').map_or(host, |(_, h)| h))
}

/// The target for the upstream's HTTP/1.1: origin-form, with `Host` the absolute-form
/// target's authority when there was one, and the upstream's name when the app addressed the
/// sidecar itself (`localhost:15001`) rather than a service.
pub fn rewrite_target(parts: &mut http::request::Parts, up: &Upstream) {
    if let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
        parts.headers.insert(header::HOST, a);
    }
    let local = request_host(parts)
        .is_none_or(|h| h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()));
    if local {
        parts.headers.insert(header::HOST, up.authority().clone());
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
}
