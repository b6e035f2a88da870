//! Finding an upstream's endpoints: addresses as written, names through hickory-resolver
//! with the servers, search domains and `ndots` of a resolv.conf (what Kubernetes writes),
//! resolved again when the answer's TTL runs out and at most `dns_refresh` apart.
//!
//! A name whose lookup fails keeps its last good addresses (logged, and shown as
//! `unresolved` in `sidecar_outbound_endpoints`). An address that leaves the answer is
//! drained: no new tries, the ones in flight finish.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Weak;
use std::time::Duration;

use hickory_resolver::Resolver;
use hickory_resolver::name_server::TokioConnectionProvider;

use super::Upstream;
use crate::config::{EndpointName, UpstreamConfig};
use crate::drain::DrainWatch;

/// Even a 0-TTL answer is not asked for again sooner than this: a DNS server that hands out
/// TTL 0 must not turn every request into a lookup.
const MIN_REFRESH: Duration = Duration::from_millis(500);
/// After a failed lookup, the next one is this soon (or `dns_refresh`, if shorter).
const RETRY_FAILED: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// A resolver for `config`, or none when every endpoint is an address.
pub fn resolver(config: &UpstreamConfig) -> Result<Option<Resolver<TokioConnectionProvider>>, ResolverError> {
    if config.endpoints.iter().all(|e| e.host.parse::<IpAddr>().is_ok()) {
        return Ok(None);
    }
    let path = config.resolv_conf.display().to_string();
    let text = std::fs::read(&config.resolv_conf)
        .map_err(|source| ResolverError::Read { path: path.clone(), source })?;
    let (conf, mut opts) = hickory_resolver::system_conf::parse_resolv_conf(text)
        .map_err(|e| ResolverError::Parse { path, message: e.to_string() })?;
    // The cache may not hold an answer past our own refresh: every refresh asks the server.
    opts.positive_max_ttl = Some(config.dns_refresh);
    opts.negative_max_ttl = Some(config.dns_refresh);
    let resolver =
        Resolver::builder_with_config(conf, TokioConnectionProvider::default()).with_options(opts).build();
    Ok(Some(resolver))
}

/// Resolves until the upstream is gone or the drain begins, publishing each new set.
pub async fn run(
    upstream: Weak<Upstream>,
    config: UpstreamConfig,
    resolver: Option<Resolver<TokioConnectionProvider>>,
    mut drain: DrainWatch,
) {
    let mut last_good: HashMap<EndpointName, Vec<SocketAddr>> = HashMap::new();
    loop {
        let mut next = config.dns_refresh;
        let mut addrs = Vec::new();
        let mut unresolved = 0;
        let mut why = None;
        for name in &config.endpoints {
            if let Ok(ip) = name.host.parse::<IpAddr>() {
                addrs.push(SocketAddr::new(ip, name.port));
                continue;
            }
            let Some(resolver) = &resolver else { continue };
            let Some(up) = upstream.upgrade() else { return };
            match resolver.lookup_ip(name.host.as_str()).await {
                Ok(answer) => {
                    let found: Vec<SocketAddr> =
                        answer.iter().map(|ip| SocketAddr::new(ip, name.port)).collect();
                    let ttl = answer.valid_until().saturating_duration_since(std::time::Instant::now());
                    next = next.min(ttl.max(MIN_REFRESH));
                    if last_good.get(name) != Some(&found) {
                        tracing::info!(upstream = %up.name, endpoint = %name, addresses = ?found, "resolved");
                    }
                    last_good.insert(name.clone(), found);
                }
                Err(e) => {
                    unresolved += 1;
                    next = next.min(RETRY_FAILED);
                    let kept = last_good.get(name).map_or(0, Vec::len);
                    why = Some(format!("{name} does not resolve: {e}"));
                    tracing::warn!(upstream = %up.name, endpoint = %name, error = %e, kept, "DNS lookup failed; keeping the last good addresses");
                }
            }
            addrs.extend(last_good.get(name).into_iter().flatten().copied());
        }
        addrs.sort();
        addrs.dedup();
        let Some(up) = upstream.upgrade() else { return };
        up.publish(&addrs, unresolved, why);
        drop(up);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = drain.signaled() => return,
        }
    }
}
