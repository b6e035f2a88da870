//! The config reloader: re-reads the file on SIGHUP or when its content changes (watched by
//! digest on the file-watcher thread), validates it whole, and applies what can change at
//! run time. A config that fails anywhere leaves the running one in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::files::{FileWatcher, Watch};
use crate::inbound::Inbound;
use crate::logship;
use crate::telemetry::LogHandle;

/// How long the file must stay the same before it is read: an editor or `kubectl cp`
/// writing it in pieces is seen as one change.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// `sidecar_config_reloads_total{result}`, both results present from the start.
pub struct ReloadMetrics {
    success: Counter,
    error: Counter,
}

impl ReloadMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::<ResultLabels, Counter>::default();
        registry.register("config_reloads", "Config reloads, by result", family.clone());
        // One statement each: `get_or_create` returns a read guard, and a second call
        // in the same expression would wait for ever to write.
        let success = family.get_or_create(&ResultLabels { result: "success" }).clone();
        let error = family.get_or_create(&ResultLabels { result: "error" }).clone();
        ReloadMetrics { success, error }
    }
}

/// Re-reads the config file and applies what it can.
pub struct Reloader {
    path: PathBuf,
    watch: Watch,
    current: Arc<Config>,
    tx: watch::Sender<Arc<Config>>,
    metrics: ReloadMetrics,
    log: Option<LogHandle>,
}

/// Resolves to true when the watched config file changed; never, without a reloader.
pub async fn file_changed(reloader: &mut Option<Reloader>) -> bool {
    match reloader {
        Some(r) => r.watch.changed().await.is_some(),
        None => std::future::pending().await,
    }
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        tx: watch::Sender<Arc<Config>>,
        metrics: ReloadMetrics,
        log: Option<LogHandle>,
        files: &FileWatcher,
    ) -> Self {
        let watch = files.watch(vec![path.clone()], SETTLE);
        let current = tx.borrow().clone();
        Reloader { path, watch, current, tx, metrics, log }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> &Config {
        &self.current
    }

    pub async fn reload(&mut self, inbound: &mut Inbound, shipping: &mut logship::Slot) {
        match self.try_reload(inbound, shipping).await {
            Ok(changed) => {
                let what = if changed { "config reloaded" } else { "config unchanged" };
                tracing::info!(file = %self.path.display(), "{what}");
                self.metrics.success.inc();
            }
            Err(e) => {
                for line in format!("{e:#}").lines() {
                    tracing::error!("config reload refused, the running config stays: {line}");
                }
                self.metrics.error.inc();
            }
        }
    }

    async fn try_reload(
        &mut self,
        inbound: &mut Inbound,
        shipping: &mut logship::Slot,
    ) -> anyhow::Result<bool> {
        let path = self.path.clone();
        // Off the data plane's workers: the volume may be slow.
        let new = tokio::task::spawn_blocking(move || config::load(&path)).await??;
        if new == *self.current {
            return Ok(false);
        }
        warn_restart_needed(&self.current, &new, &self.path);
        inbound.apply(&new)?;
        shipping.apply(new.logship.as_ref(), new.shutdown.drain_timeout).await?;
        if new.telemetry.log_level != self.current.telemetry.log_level
            && let Some(log) = &self.log
        {
            log.set(&new.telemetry.log_level)?;
        }
        let new = Arc::new(new);
        self.current = new.clone();
        self.tx.send_replace(new);
        Ok(true)
    }
}

/// Settings fixed at start: a reload cannot change them, and says so.
fn warn_restart_needed(old: &Config, new: &Config, path: &Path) {
    let fixed = [
        ("admin.listen", old.admin != new.admin),
        ("runtime.worker_threads", old.runtime != new.runtime),
        ("telemetry.access_log", old.telemetry.access_log != new.telemetry.access_log),
        ("telemetry.log_format", old.telemetry.log_format != new.telemetry.log_format),
        ("telemetry.tracing", old.telemetry.tracing != new.telemetry.tracing),
    ];
    for (field, differs) in fixed {
        if differs {
            tracing::warn!(file = %path.display(), field, "changed, but takes effect only after a restart");
        }
    }
}
