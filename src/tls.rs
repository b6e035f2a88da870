//! TLS: server configs for inbound listeners and client configs for outbound upstreams
//! (both with file-watching rotation), the peer's
//! workload identity, and the dev CA behind `sidecar certs`.
//!
//! rustls with the ring provider: TLS 1.3 and 1.2 only, and only its default suites, which
//! are all AEAD with forward secrecy. Private keys are read into rustls and nowhere else:
//! not into the config, logs, errors or `/config`.

pub mod certs;
pub mod client;
pub mod identity;
mod key;
pub mod server;

pub use identity::PeerIdentity;
pub use server::{ServerTls, TlsError};

use crate::config::{Config, ConfigError, Problem};

/// Loads every listener's TLS files the way `run` would, for `sidecar check`: each problem
/// names the field and the file.
pub fn check_files(file: &std::path::Path, config: &Config) -> Result<(), ConfigError> {
    let inbound = config.inbound.iter().enumerate().filter_map(|(i, l)| {
        let tls = l.tls.as_ref()?;
        server::check(tls)
            .err()
            .map(|e| Problem { path: format!("inbound[{i}].tls"), message: e.to_string() })
    });
    let outbound = config.outbound.iter().enumerate().filter_map(|(i, o)| {
        let tls = o.upstream.tls.as_ref()?;
        client::check(tls)
            .err()
            .map(|e| Problem { path: format!("outbound[{i}].upstream.tls"), message: e.to_string() })
    });
    let problems: Vec<Problem> = inbound.chain(outbound).collect();
    if problems.is_empty() { Ok(()) } else { Err(ConfigError { file: file.to_owned(), problems }) }
}
