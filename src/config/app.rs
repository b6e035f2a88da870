//! The `app` section: where the application listens, what it speaks, and how its health is
//! checked.
//!
//! Not responsible for running the checks (`crate::health`) or for probing what the app
//! speaks under `auto` (`crate::proxy::pool`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Ctx, Scalar, duration_str};

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
    let address = cx.addr("app.address", raw.address.as_deref(), "127.0.0.1:8080");
    let health = raw.health.map(|h| validate_health(h, cx));
    AppConfig {
        address,
        http: raw.http.unwrap_or(HttpVersion::Auto),
        health,
        tcp_check_interval: Duration::from_secs(1),
    }
}

fn validate_health(h: RawHealth, cx: &mut Ctx) -> HealthConfig {
    let path = h.path.unwrap_or_else(|| "/healthz".to_owned());
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        cx.bad(
            "app.health.path",
            format!("`{path}` is not a path: it must start with `/` and have no spaces"),
        );
    }
    let interval = cx.positive_duration("app.health.interval", h.interval.as_ref(), Duration::from_secs(1));
    let timeout = cx.positive_duration("app.health.timeout", h.timeout.as_ref(), Duration::from_secs(1));
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
    /// Where the application listens. Default 127.0.0.1:8080.
    pub address: SocketAddr,
    /// What the app speaks. Default `auto`.
    pub http: HttpVersion,
    /// How `/ready` learns the app is healthy. `None`: a TCP connect to `address`.
    pub health: Option<HealthConfig>,
    /// Interval and timeout of the TCP connect check used when `health` is omitted.
    #[serde(with = "duration_str")]
    pub tcp_check_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthConfig {
    /// HTTP GET path; a 2xx answer means healthy. Default `/healthz`.
    pub path: String,
    /// Time between checks. Default 1s.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// How long one check may take. Default 1s.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
}
