//! Wires the process together and runs it: runtime, telemetry, admin, listeners, health,
//! reloads, and the drain at the end. Reads top to bottom in the order things start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AdminState};
use crate::config::{self, Config};
use crate::drain::{Drain, Readiness};
use crate::health;
use crate::inbound::Inbound;
use crate::telemetry::{AccessLog, LogHandle, Metrics};

/// How often the config file is checked for changes. ConfigMap volumes update by swapping a
/// symlink, which inotify on the file itself misses; a stat-and-read every second is simple
/// and catches every kind of update.
const CONFIG_POLL: Duration = Duration::from_secs(1);

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every connection finished, or the drain timeout passed.
    Drained,
    /// A second signal cut the drain short.
    Forced,
}

/// The worker threads a config asks for: 0 means one per CPU this process may use
/// (`available_parallelism` honours affinity masks and cgroup CPU quotas).
pub fn worker_threads(config: &Config) -> usize {
    match config.runtime.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Runs the sidecar until it has drained. `path` is watched for reloads when given.
pub fn run(config: Config, path: Option<PathBuf>, log: Option<LogHandle>) -> anyhow::Result<Exit> {
    let workers = worker_threads(&config);
    // One worker: a current-thread runtime, which skips work stealing and its cross-thread
    // wake-ups (the configuration the benchmark measures: one core per proxy).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime =
        builder.enable_all().thread_name("sidecar-worker").build().context("starting the runtime")?;
    tracing::info!(workers, version = env!("CARGO_PKG_VERSION"), "starting");
    runtime.block_on(serve(config, path, log))
}

async fn serve(config: Config, path: Option<PathBuf>, log: Option<LogHandle>) -> anyhow::Result<Exit> {
    let mut metrics = Metrics::new();
    let readiness = Readiness::new();
    let (drain, drain_watch) = Drain::new();
    let access_log = AccessLog::start(&config.telemetry.access_log, &mut metrics.registry)?;
    let metrics = Arc::new(metrics);

    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    let admin_addr = admin::start(
        config.admin.listen,
        AdminState {
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            config: config_rx.clone(),
            log: log.clone(),
            shutdown: shutdown_tx,
        },
    )?;
    tracing::info!(addr = %admin_addr, "admin server listening");

    let mut inbound = Inbound::new(metrics.clone(), access_log, drain_watch);
    inbound.apply(&config)?;
    readiness.set_listeners_bound();
    let health_task = tokio::spawn(health::run(config_rx, readiness.clone(), metrics.app_ready.clone()));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut reloader = path.map(|p| Reloader::new(p, config_tx, metrics.clone(), log));
    let mut poll = tokio::time::interval(CONFIG_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let why = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = shutdown_rx.recv() => break "POST /shutdown",
            _ = sighup.recv() => {
                if let Some(r) = &mut reloader {
                    tracing::info!("SIGHUP: reloading the config");
                    r.reload(&mut inbound).await;
                }
            }
            _ = poll.tick(), if reloader.is_some() => {
                if let Some(r) = &mut reloader
                    && r.changed().await {
                        tracing::info!(file = %r.path.display(), "config file changed: reloading");
                        r.reload(&mut inbound).await;
                    }
            }
        }
    };

    let drain_timeout =
        reloader.as_ref().map_or(config.shutdown.drain_timeout, |r| r.current.shutdown.drain_timeout);
    tracing::info!(signal = why, timeout = ?drain_timeout, "draining: not ready, no new connections, finishing requests in flight");
    readiness.set_draining();
    drain.start();
    // Our own handles would keep the drain waiting for ever.
    drop(inbound);
    health_task.abort();

    let exit = tokio::select! {
        done = drain.wait(drain_timeout) => {
            if done {
                tracing::info!("drained");
            } else {
                tracing::warn!(left = drain.remaining(), "drain timeout reached; closing the connections left");
            }
            Exit::Drained
        }
        _ = sigterm.recv() => Exit::Forced,
        _ = sigint.recv() => Exit::Forced,
    };
    if exit == Exit::Forced {
        tracing::warn!(left = drain.remaining(), "second signal: exiting now");
    }
    Ok(exit)
}

/// Re-reads the config file on SIGHUP or when it changes, and applies what it can.
struct Reloader {
    path: PathBuf,
    last_text: Option<Vec<u8>>,
    current: Arc<Config>,
    tx: watch::Sender<Arc<Config>>,
    metrics: Arc<Metrics>,
    log: Option<LogHandle>,
}

impl Reloader {
    fn new(
        path: PathBuf,
        tx: watch::Sender<Arc<Config>>,
        metrics: Arc<Metrics>,
        log: Option<LogHandle>,
    ) -> Self {
        let last_text = std::fs::read(&path).ok();
        let current = tx.borrow().clone();
        Reloader { path, last_text, current, tx, metrics, log }
    }

    /// True when the file's bytes differ from the last ones seen.
    async fn changed(&mut self) -> bool {
        match tokio::fs::read(&self.path).await {
            Ok(text) if self.last_text.as_deref() != Some(text.as_slice()) => {
                self.last_text = Some(text);
                true
            }
            _ => false,
        }
    }

    async fn reload(&mut self, inbound: &mut Inbound) {
        let ok = match self.try_reload(inbound).await {
            Ok(changed) => {
                if changed {
                    tracing::info!(file = %self.path.display(), "config reloaded");
                } else {
                    tracing::info!(file = %self.path.display(), "config unchanged");
                }
                true
            }
            Err(e) => {
                for line in format!("{e:#}").lines() {
                    tracing::error!("config reload refused, the running config stays: {line}");
                }
                false
            }
        };
        self.metrics.config_reload(ok);
    }

    async fn try_reload(&mut self, inbound: &mut Inbound) -> anyhow::Result<bool> {
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || config::load(&path)).await??;
        if new == *self.current {
            return Ok(false);
        }
        warn_restart_needed(&self.current, &new, &self.path);
        inbound.apply(&new)?;
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
    ];
    for (field, differs) in fixed {
        if differs {
            tracing::warn!(file = %path.display(), field, "changed, but takes effect only after a restart");
        }
    }
}
