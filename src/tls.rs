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

use std::sync::Weak;

use tokio::sync::oneshot;

use crate::config::{Config, ConfigError, Problem};

/// TLS material built from watched files: a listener's server config, an upstream's client
/// config.
trait Rebuild: Send + Sync + 'static {
    /// Rebuilds from the files; on error the current material stays.
    fn rebuild(&self) -> Result<(), TlsError>;
}

/// Rebuilds `tls` whenever the watched files settle on new content, until its owner drops it
/// (a reload replaced it, or the process is exiting: `dropped`) or the watcher stops. The
/// rebuild reads files, so it runs on a blocking thread. `owner` names it in the log
/// (`listener=web`, `upstream=orders`).
async fn rotate<T: Rebuild>(
    tls: Weak<T>,
    mut watch: crate::files::Watch,
    mut dropped: oneshot::Receiver<()>,
    owner: (&'static str, String),
) {
    let (kind, name) = owner;
    loop {
        tokio::select! {
            changed = watch.changed() => if changed.is_none() { return },
            _ = &mut dropped => return,
        }
        let Some(t) = tls.upgrade() else { return };
        match tokio::task::spawn_blocking(move || t.rebuild()).await {
            Ok(Ok(())) => tracing::info!(%kind, %name, "TLS material rotated"),
            Ok(Err(e)) => {
                tracing::error!(%kind, %name, error = %e, "TLS files changed but cannot be used; keeping the current ones")
            }
            Err(e) => tracing::error!(%kind, %name, error = %e, "TLS rebuild failed"),
        }
    }
}

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
