//! The `app` section: where the application listens, what it speaks, and how its health is
//! checked.
//!
//! Not responsible for running the checks (`crate::health`) or for probing what the app
//! speaks under `auto` (`crate::proxy::pool`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Ctx, Scalar, duration_str};
use crate::net::Addr;

// Defaults are the contract's (INTERFACE.md) unless a comment says otherwise.

/// The app in the same pod, on the port Tomcat and Spring Boot listen on by default.
pub const DEFAULT_APP_ADDRESS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// `auto` works for HTTP/1.1 apps and gRPC/h2c apps alike without a line of config.
pub const DEFAULT_APP_HTTP: HttpVersion = HttpVersion::Auto;
/// The Kubernetes convention for a health endpoint.
pub const DEFAULT_HEALTH_PATH: &str = "/healthz";
/// With `health::FAILURES_TO_UNREADY` (3) failures, a dead app leaves its Service in about 3s.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Kubernetes' own default probe `timeoutSeconds`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Interval and timeout of the TCP connect check used when `app.health` is omitted. Not
/// settable (the contract has no field for it): the same 1s as the HTTP check's defaults, so
/// readiness reacts alike with or without a health path; a local connect takes well under it.
pub const TCP_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawApp {
    address: Option<String>,
    http: Option<HttpVersion>,
    health: Option<RawHealth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    path: Option<String>,
    interval: Option<Scalar>,
    timeout: Option<Scalar>,
}

pub(super) fn validate(raw: RawApp, cx: &mut Ctx) -> AppConfig {
    let address = raw.address.map_or(Addr::Tcp(DEFAULT_APP_ADDRESS), |a| cx.upstream("app.address", &a));
    let health = raw.health.map(|h| validate_health(h, cx));
    AppConfig { address, http: raw.http.unwrap_or(DEFAULT_APP_HTTP), health }
}

fn validate_health(h: RawHealth, cx: &mut Ctx) -> HealthConfig {
    let path = h.path.unwrap_or_else(|| DEFAULT_HEALTH_PATH.to_owned());
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        cx.bad(
            "app.health.path",
            format!("`{path}` is not a path: it must start with `/` and have no spaces"),
        );
    }
    let interval = cx.positive_duration("app.health.interval", h.interval.as_ref(), DEFAULT_HEALTH_INTERVAL);
    let timeout = cx.positive_duration("app.health.timeout", h.timeout.as_ref(), DEFAULT_HEALTH_TIMEOUT);
    HealthConfig { path, interval, timeout }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    Http1,
    Http2,
    /// What the app speaks: HTTP/2 clients stay on HTTP/2 when the app answers an HTTP/2
    /// PING (gRPC servers, h2c-capable servers), and are translated to HTTP/1.1 when it does
    /// not; HTTP/1.1 clients stay on HTTP/1.1.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppConfig {
    /// Where the application listens: TCP, or a Unix socket (`unix:/path`). Default
    /// [`DEFAULT_APP_ADDRESS`], 127.0.0.1:8080.
    pub address: Addr,
    /// What the app speaks. Default [`DEFAULT_APP_HTTP`], `auto`.
    pub http: HttpVersion,
    /// How `/ready` learns the app is healthy. `None`: a connect to `address`, every
    /// [`TCP_CHECK_INTERVAL`].
    pub health: Option<HealthConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthConfig {
    /// HTTP GET path; a 2xx answer means healthy. Default [`DEFAULT_HEALTH_PATH`], `/healthz`.
    pub path: String,
    /// Time between checks. Default [`DEFAULT_HEALTH_INTERVAL`], 1s.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// How long one check may take. Default [`DEFAULT_HEALTH_TIMEOUT`], 1s.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SMALLEST, parse_str, smallest};

    #[test]
    fn defaults_are_what_the_smallest_config_gets() {
        let app = smallest().app;
        assert_eq!(
            app,
            AppConfig { address: Addr::Tcp(DEFAULT_APP_ADDRESS), http: DEFAULT_APP_HTTP, health: None }
        );
    }

    /// `health` has no defaults of its own until it is written, so it is checked as `{}`.
    #[test]
    fn health_defaults_are_what_an_empty_health_gets() {
        let c = parse_str(&format!("{SMALLEST}app: {{ health: {{}} }}\n")).unwrap();
        let health = HealthConfig {
            path: DEFAULT_HEALTH_PATH.to_owned(),
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
        };
        assert_eq!(c.app.health, Some(health));
    }
}
