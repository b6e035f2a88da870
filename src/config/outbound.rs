//! The `outbound` section: ambassador listeners the app calls on localhost, each carrying
//! calls to one named upstream found by DNS, with balancing, timeouts, retries and ejection.
//!
//! Not responsible for resolving names or sending anything (`crate::outbound`). Each
//! listener is also checked against the inbound ones: names and addresses are shared.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::inbound::{self, InboundConfig, Protocol, RawLimits};
use super::parse::{Ctx, Scalar, duration_str, parse_size};
use super::{HttpVersion, Limits};

/// How often names are resolved again when the answer's TTL is longer (the contract's).
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// Where the resolver's servers, search domains and `ndots` come from: what Kubernetes writes.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// The contract's: learn what each endpoint speaks (a PING in cleartext, ALPN over TLS).
pub const DEFAULT_UPSTREAM_HTTP: HttpVersion = HttpVersion::Auto;
/// Linkerd's and Finagle's default: latency-aware, and cheap at any endpoint count.
pub const DEFAULT_BALANCE: Balance = Balance::P2cEwma;
/// The contract's: a connect within the cluster that has not finished in 1s is not coming.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Envoy's route timeout, as inbound.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The first try and one retry (gRPC's `maxAttempts` counts the same way).
pub const DEFAULT_ATTEMPTS: u32 = 2;
/// Linkerd's retry budget: retries may add 20 % to live traffic, plus 10 a second so that
/// a quiet service can still retry.
pub const DEFAULT_BUDGET: f64 = 0.2;
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// First pause before a retry, doubled for each next one, jittered to ½–1½ times itself.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// Request bodies up to this size are kept so that a retry can send them again (Linkerd's
/// 64 KiB): larger ones stream through once and are never retried.
pub const DEFAULT_MAX_REPLAY_BODY: u64 = 64 * 1024;
/// Envoy's `consecutive_5xx` and `base_ejection_time` defaults, and `max_ejection_percent`
/// halved: ejecting more than half the endpoints moves the whole load onto the rest.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_EJECTED: f64 = 0.5;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawOutbound {
    name: Option<String>,
    listen: Option<String>,
    protocol: Option<Protocol>,
    hosts: Vec<String>,
    upstream: Option<RawUpstream>,
    balance: Option<Balance>,
    connect_timeout: Option<Scalar>,
    per_try_timeout: Option<Scalar>,
    request_timeout: Option<Scalar>,
    retry: RawRetry,
    outlier: RawOutlier,
    limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    endpoints: Vec<String>,
    dns_refresh: Option<Scalar>,
    resolv_conf: Option<PathBuf>,
    http: Option<HttpVersion>,
    tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstreamTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    identity: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    attempts: Option<u32>,
    budget: Option<String>,
    min_retries_per_second: Option<u32>,
    on: Option<Vec<Scalar>>,
    backoff: Option<Scalar>,
    max_body: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOutlier {
    consecutive_failures: Option<u32>,
    base_ejection: Option<Scalar>,
    max_ejection: Option<Scalar>,
    max_ejected: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    P2cEwma,
    RoundRobin,
}

/// One `host:port` of `upstream.endpoints`: an IP address, or a name resolved by DNS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointName {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for EndpointName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamConfig {
    pub endpoints: Vec<EndpointName>,
    #[serde(with = "duration_str")]
    pub dns_refresh: Duration,
    pub resolv_conf: PathBuf,
    pub http: HttpVersion,
    /// Originate TLS to every endpoint. `None`: plain text.
    pub tls: Option<UpstreamTls>,
}

/// Paths only: the key's content is read into rustls and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    /// Roots the server's chain must lead to; `None`: the system's.
    pub ca: Option<PathBuf>,
    /// The workload's certificate and key, presented to servers that ask (mTLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// SNI and the name checked when `identity` is not set; default: the first endpoint's host.
    pub server_name: Option<String>,
    /// The server's SPIFFE ID (or DNS SAN); set, it replaces the host name check.
    pub identity: Option<String>,
}

/// What a failed try may be retried on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// The connection could not be made: nothing was sent.
    pub connect_failure: bool,
    /// The connection broke before a response head arrived.
    pub reset: bool,
    /// Response statuses.
    pub statuses: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryConfig {
    /// Tries in all, the first included; 1 turns retries off.
    pub attempts: u32,
    /// Retries as a share of first tries, over the last 10 seconds.
    pub budget: f64,
    pub min_retries_per_second: u32,
    pub on: RetryOn,
    #[serde(with = "duration_str")]
    pub backoff: Duration,
    pub max_body: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    #[serde(with = "duration_str")]
    pub base_ejection: Duration,
    #[serde(with = "duration_str")]
    pub max_ejection: Duration,
    pub max_ejected: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboundConfig {
    pub name: String,
    /// Several upstreams may share `listen` when each names the hosts it answers to; the
    /// listener then routes by the request's host. Empty: every request of the listener.
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub hosts: Vec<String>,
    pub upstream: UpstreamConfig,
    pub balance: Balance,
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Each try's wait for a response head; `None`: only `request_timeout` bounds it.
    #[serde(serialize_with = "optional_duration")]
    pub per_try_timeout: Option<Duration>,
    /// The whole call's wait for a response head, retries and backoff included; 0s: none.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
    pub retry: RetryConfig,
    pub outlier: OutlierConfig,
    pub limits: Limits,
}

impl OutboundConfig {
    /// The listener half, in the shape the shared HTTP server takes: no TLS (the app speaks
    /// plain HTTP to localhost), and no fixed target (each try picks an endpoint).
    pub fn listener(&self) -> InboundConfig {
        InboundConfig {
            name: self.name.clone(),
            listen: self.listen,
            protocol: self.protocol,
            target: crate::net::Addr::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))),
            limits: self.limits.clone(),
            tls: None,
            request_timeout: self.request_timeout,
            connect_timeout: self.connect_timeout,
        }
    }
}

fn optional_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration_str::serialize(d, s),
        None => s.serialize_none(),
    }
}

/// `inbound`: the validated inbound listeners, whose names and addresses these may not reuse.
pub(super) fn validate(
    raw: Vec<RawOutbound>,
    cx: &mut Ctx,
    admin_listen: SocketAddr,
    inbound: &[InboundConfig],
) -> Vec<OutboundConfig> {
    let mut out: Vec<OutboundConfig> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("outbound[{i}]");
        let taken: Vec<(&str, SocketAddr)> = inbound
            .iter()
            .map(|l| (l.name.as_str(), l.listen))
            .chain(out.iter().map(|o| (o.name.as_str(), o.listen)))
            .collect();
        let name = inbound::validate_name(&at, i, r.name, cx, &taken);
        let hosts = validate_hosts(&at, r.hosts, cx);
        // Outbound listeners that all route by host may share an address.
        let sharing = |o: &OutboundConfig| !hosts.is_empty() && !o.hosts.is_empty();
        let exclusive: Vec<(&str, SocketAddr)> = inbound
            .iter()
            .map(|l| (l.name.as_str(), l.listen))
            .chain(out.iter().filter(|o| !sharing(o)).map(|o| (o.name.as_str(), o.listen)))
            .collect();
        let listen = inbound::validate_listen(&at, r.listen.as_deref(), cx, &exclusive, admin_listen);
        for o in out.iter().filter(|o| o.listen == listen && sharing(o)) {
            if let Some(h) = hosts.iter().find(|h| o.hosts.contains(h)) {
                cx.bad(format!("{at}.hosts"), format!("`{h}` is also routed to `{}` on {listen}", o.name));
            }
        }
        let protocol = r.protocol.unwrap_or(Protocol::Http);
        if protocol == Protocol::Tcp && !hosts.is_empty() {
            cx.bad(format!("{at}.hosts"), "a `tcp` listener has no host to route by; remove `hosts`");
        }
        let upstream = validate_upstream(&at, r.upstream, cx);
        let request_timeout = cx.duration(
            &format!("{at}.request_timeout"),
            r.request_timeout.as_ref(),
            DEFAULT_REQUEST_TIMEOUT,
        );
        let per_try_timeout = r.per_try_timeout.as_ref().map(|s| {
            cx.positive_duration(&format!("{at}.per_try_timeout"), Some(s), DEFAULT_REQUEST_TIMEOUT)
        });
        out.push(OutboundConfig {
            name,
            listen,
            protocol,
            hosts,
            upstream,
            balance: r.balance.unwrap_or(DEFAULT_BALANCE),
            connect_timeout: cx.positive_duration(
                &format!("{at}.connect_timeout"),
                r.connect_timeout.as_ref(),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            per_try_timeout,
            request_timeout,
            retry: validate_retry(&at, r.retry, cx),
            outlier: validate_outlier(&at, r.outlier, cx),
            limits: inbound::validate_limits(&at, r.limits, cx),
        });
    }
    out
}

/// Host names, as a client writes them in `Host` or an absolute-form target (no port).
fn validate_hosts(at: &str, raw: Vec<String>, cx: &mut Ctx) -> Vec<String> {
    raw.into_iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let lower = h.trim().trim_end_matches('.').to_ascii_lowercase();
            match parse_endpoint(&format!("{lower}:1")) {
                Ok(_) if !lower.contains(':') => Some(lower),
                _ => {
                    cx.bad(
                        format!("{at}.hosts[{i}]"),
                        format!("`{h}` is not a host name (write it without a port)"),
                    );
                    None
                }
            }
        })
        .collect()
}

fn validate_upstream(at: &str, raw: Option<RawUpstream>, cx: &mut Ctx) -> UpstreamConfig {
    let at = format!("{at}.upstream");
    let raw = raw.unwrap_or_else(|| {
        cx.bad(&at, "missing: `endpoints`, the `host:port` names or addresses to call");
        RawUpstream::default()
    });
    if raw.endpoints.is_empty() {
        cx.bad(
            format!("{at}.endpoints"),
            "at least one `host:port` is needed, like `orders.default.svc:8080`",
        );
    }
    let endpoints = raw
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match parse_endpoint(e) {
            Ok(n) => Some(n),
            Err(m) => {
                cx.bad(format!("{at}.endpoints[{i}]"), m);
                None
            }
        })
        .collect();
    let http = raw.http.unwrap_or(DEFAULT_UPSTREAM_HTTP);
    let tls = raw.tls.map(|t| {
        if t.cert.is_some() != t.key.is_some() {
            cx.bad(format!("{at}.tls"), "`cert` and `key` go together: set both (mTLS) or neither");
        }
        if t.identity.as_deref().is_some_and(|i| i.trim().is_empty()) {
            cx.bad(format!("{at}.tls.identity"), "is empty");
        }
        if let Some(n) = &t.server_name
            && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
        {
            cx.bad(format!("{at}.tls.server_name"), format!("`{n}` is not a DNS name or an IP address"));
        }
        UpstreamTls { ca: t.ca, cert: t.cert, key: t.key, server_name: t.server_name, identity: t.identity }
    });
    UpstreamConfig {
        tls,
        endpoints,
        dns_refresh: cx.positive_duration(
            &format!("{at}.dns_refresh"),
            raw.dns_refresh.as_ref(),
            DEFAULT_DNS_REFRESH,
        ),
        resolv_conf: raw.resolv_conf.unwrap_or_else(|| PathBuf::from(DEFAULT_RESOLV_CONF)),
        http,
    }
}

/// `host:port`, `1.2.3.4:port` or `[::1]:port`. Names are checked for shape only: whether
/// they resolve is known at run time, and may change.
fn parse_endpoint(text: &str) -> Result<EndpointName, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(EndpointName { host: a.ip().to_string(), port: a.port() });
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("`{text}` is not HOST:PORT, like `orders.default.svc:8080`"));
    };
    let port: u16 = port.parse().map_err(|_| format!("`{text}`: `{port}` is not a port number"))?;
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("`{text}`: `{host}` is not a DNS name or an IP address"));
    }
    if port == 0 {
        return Err(format!("`{text}`: port 0 cannot be called"));
    }
    Ok(EndpointName { host: host.to_ascii_lowercase(), port })
}

fn validate_retry(at: &str, raw: RawRetry, cx: &mut Ctx) -> RetryConfig {
    let at = format!("{at}.retry");
    let attempts = match raw.attempts {
        None => DEFAULT_ATTEMPTS,
        Some(0) => {
            cx.bad(format!("{at}.attempts"), "must be at least 1 (the first try); 1 turns retries off");
            1
        }
        Some(n) if n > 10 => {
            cx.bad(format!("{at}.attempts"), format!("{n} is more than 10 tries"));
            10
        }
        Some(n) => n,
    };
    let mut on = RetryOn { connect_failure: true, reset: true, statuses: Vec::new() };
    if let Some(list) = raw.on {
        on = RetryOn { connect_failure: false, reset: false, statuses: Vec::new() };
        for (i, item) in list.iter().enumerate() {
            let item = match item {
                Scalar::Int(n) => n.to_string(),
                Scalar::Str(s) => s.clone(),
            };
            match item.as_str() {
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "gateway-error" => on.statuses.extend([502, 503, 504]),
                "5xx" => on.statuses.extend(500..=599),
                s => match s.parse::<u16>() {
                    Ok(n) if (500..=599).contains(&n) || n == 429 || n == 408 => on.statuses.push(n),
                    _ => cx.bad(
                        format!("{at}.on[{i}]"),
                        format!("`{s}`: expected connect-failure, reset, gateway-error, 5xx, 408, 429 or a 5xx status"),
                    ),
                },
            }
        }
        on.statuses.sort_unstable();
        on.statuses.dedup();
    }
    let max_body = match &raw.max_body {
        None => DEFAULT_MAX_REPLAY_BODY,
        Some(s) => match parse_size(s) {
            Ok(n) if n <= 16 << 20 => n,
            Ok(n) => {
                cx.bad(
                    format!("{at}.max_body"),
                    format!("{n} bytes is over 16MiB: every call in flight may hold this much"),
                );
                DEFAULT_MAX_REPLAY_BODY
            }
            Err(m) => {
                cx.bad(format!("{at}.max_body"), m);
                DEFAULT_MAX_REPLAY_BODY
            }
        },
    };
    RetryConfig {
        attempts,
        budget: percent(cx, &format!("{at}.budget"), raw.budget.as_deref(), DEFAULT_BUDGET, 10.0),
        min_retries_per_second: raw.min_retries_per_second.unwrap_or(DEFAULT_MIN_RETRIES_PER_SECOND),
        on,
        backoff: cx.duration(&format!("{at}.backoff"), raw.backoff.as_ref(), DEFAULT_RETRY_BACKOFF),
        max_body,
    }
}

fn validate_outlier(at: &str, raw: RawOutlier, cx: &mut Ctx) -> OutlierConfig {
    let at = format!("{at}.outlier");
    let base_ejection = cx.positive_duration(
        &format!("{at}.base_ejection"),
        raw.base_ejection.as_ref(),
        DEFAULT_BASE_EJECTION,
    );
    let max_ejection =
        cx.positive_duration(&format!("{at}.max_ejection"), raw.max_ejection.as_ref(), DEFAULT_MAX_EJECTION);
    if max_ejection < base_ejection {
        cx.bad(format!("{at}.max_ejection"), "is shorter than `base_ejection`");
    }
    OutlierConfig {
        consecutive_failures: raw.consecutive_failures.unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
        base_ejection,
        max_ejection,
        max_ejected: percent(
            cx,
            &format!("{at}.max_ejected"),
            raw.max_ejected.as_deref(),
            DEFAULT_MAX_EJECTED,
            1.0,
        ),
    }
}

/// `20%` → 0.2, at most `max` (as a fraction).
fn percent(cx: &mut Ctx, path: &str, raw: Option<&str>, default: f64, max: f64) -> f64 {
    let Some(text) = raw else { return default };
    match text.trim().strip_suffix('%').map(|n| n.trim().parse::<f64>()) {
        Some(Ok(n)) if n >= 0.0 && n / 100.0 <= max => n / 100.0,
        Some(Ok(n)) => {
            cx.bad(path, format!("{n}% is outside 0%..{}%", max * 100.0));
            default
        }
        _ => {
            cx.bad(path, format!("`{text}` is not a percentage: write it like `20%`"));
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{SMALLEST, parse_str};
    use super::*;

    fn one(extra: &str) -> Result<OutboundConfig, String> {
        let text = format!(
            "{SMALLEST}outbound:\n  - {{ name: orders, listen: 127.0.0.1:15001, upstream: {{ endpoints: [\"orders.default.svc:8080\", \"10.0.0.7:80\"] }}{extra} }}\n"
        );
        parse_str(&text).map(|c| c.outbound[0].clone()).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_contracts() {
        let o = one("").unwrap();
        assert_eq!(o.upstream.endpoints[0], EndpointName { host: "orders.default.svc".into(), port: 8080 });
        assert_eq!(o.upstream.endpoints[1].to_string(), "10.0.0.7:80");
        assert_eq!(o.upstream.dns_refresh, Duration::from_secs(5));
        assert_eq!(o.balance, Balance::P2cEwma);
        assert_eq!(o.connect_timeout, Duration::from_secs(1));
        assert_eq!(o.retry.attempts, 2);
        assert!(o.retry.on.connect_failure && o.retry.on.reset && o.retry.on.statuses.is_empty());
        assert_eq!(o.outlier.consecutive_failures, 5);
        assert_eq!(o.outlier.max_ejected, 0.5);
    }

    #[test]
    fn retry_and_outlier_as_written() {
        let o = one(", retry: { attempts: 3, budget: 50%, on: [connect-failure, 503, gateway-error] }, outlier: { max_ejected: 100% }, balance: round-robin, per_try_timeout: 250ms").unwrap();
        assert_eq!(o.retry.attempts, 3);
        assert_eq!(o.retry.budget, 0.5);
        assert!(o.retry.on.connect_failure && !o.retry.on.reset);
        assert_eq!(o.retry.on.statuses, [502, 503, 504]);
        assert_eq!(o.outlier.max_ejected, 1.0);
        assert_eq!(o.balance, Balance::RoundRobin);
        assert_eq!(o.per_try_timeout, Some(Duration::from_millis(250)));
    }

    #[test]
    fn bad_values_are_named() {
        let e =
            one(", retry: { attempts: 0, budget: lots, on: [sometimes] }, outlier: { max_ejected: 150% }")
                .unwrap_err();
        for needle in [
            "outbound[0].retry.attempts: must be at least 1",
            "outbound[0].retry.budget: `lots` is not a percentage",
            "outbound[0].retry.on[0]: `sometimes`",
            "outbound[0].outlier.max_ejected: 150% is outside",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        let e = parse_str(&format!(
            "{SMALLEST}outbound:\n  - {{ name: web, listen: 127.0.0.1:15001, upstream: {{ endpoints: [\"bad name:80\", \"x:http\"] }} }}\n"
        ))
        .unwrap_err()
        .to_string();
        for needle in [
            "outbound[0].name: `web` is used by another listener",
            "outbound[0].upstream.endpoints[0]: `bad name:80`: `bad name` is not a DNS name",
            "outbound[0].upstream.endpoints[1]: `x:http`: `http` is not a port number",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
    }

    #[test]
    fn listeners_that_route_by_host_share_an_address() {
        let up = "upstream: { endpoints: [\"127.0.0.1:9\"] }";
        let ok = format!(
            "outbound:\n  - {{ name: a, listen: 127.0.0.1:15001, hosts: [orders, Orders.Default.svc], {up} }}\n  - {{ name: b, listen: 127.0.0.1:15001, hosts: [payments], {up} }}\n"
        );
        let c = parse_str(&ok).unwrap();
        assert_eq!(c.outbound[0].hosts, ["orders", "orders.default.svc"]);
        let clash = format!(
            "outbound:\n  - {{ name: a, listen: 127.0.0.1:15001, hosts: [orders], {up} }}\n  - {{ name: b, listen: 127.0.0.1:15001, hosts: [orders], {up} }}\n  - {{ name: c, listen: 127.0.0.1:15001, {up} }}\n"
        );
        let e = parse_str(&clash).unwrap_err().to_string();
        assert!(e.contains("outbound[1].hosts: `orders` is also routed to `a`"), "{e}");
        assert!(e.contains("outbound[2].listen: 127.0.0.1:15001 is used by another listener"), "{e}");
    }

    #[test]
    fn an_ambassador_alone_is_a_valid_sidecar() {
        let c = parse_str("outbound: [{ name: orders, listen: 127.0.0.1:15001, upstream: { endpoints: [\"127.0.0.1:9\"] } }]\n").unwrap();
        assert!(c.inbound.is_empty());
        assert_eq!(c.outbound.len(), 1);
    }
}
