//! Wires the process together and runs it: runtime, telemetry, admin, listeners, health,
//! reloads, and the drain at the end. Reads top to bottom in the order things start.

mod reload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use self::reload::{ReloadMetrics, Reloader};
use crate::admin::{self, AdminState, Board};
use crate::config::Config;
use crate::drain::Drain;
use crate::files::FileWatcher;
use crate::health;
use crate::inbound::{Families, Inbound, Recorders};
use crate::k8s::notify;
use crate::logship;
use crate::readiness::Readiness;
use crate::telemetry::{AccessLog, LogHandle, Tracer, metrics};

/// How often watched files (the config, TLS material) are read and compared by digest.
/// ConfigMap and Secret volumes update by swapping a symlink, which inotify on the file
/// itself misses; a read every second is simple and catches every kind of update.
const FILE_POLL: Duration = Duration::from_secs(1);

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
/// Longest the exit waits for queued spans to reach the collector.
const SPAN_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

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
    // Each module registers its own families; the registry is read-only from here on.
    let started = std::time::SystemTime::now();
    let mut registry = metrics::registry();
    let listener_metrics = Families::register(&mut registry);
    let app_ready_gauge = health::register_metrics(&mut registry);
    let reload_metrics = ReloadMetrics::register(&mut registry);
    let access_log = AccessLog::start(&config.telemetry.access_log, &mut registry)?;
    let tracer = Tracer::start(config.telemetry.tracing.as_ref(), &mut registry)?;
    let logship_metrics = logship::Metrics::register(&mut registry);
    let notify_metrics = notify::Metrics::register(&mut registry);
    let histograms = listener_metrics.histograms();
    let exposition = Arc::new(metrics::Exposition::new(Arc::new(registry), histograms, started));
    let board = Arc::new(Board::default());

    let readiness = Readiness::new();
    let inbound_ready = readiness.register("inbound");
    let app_ready = readiness.register("app");
    let (drain, drain_watch) = Drain::new();
    let files = FileWatcher::start(FILE_POLL).context("starting the file watcher")?;

    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    let admin_addr = admin::start(
        config.admin.listen,
        AdminState {
            readiness: readiness.clone(),
            metrics: exposition,
            board: board.clone(),
            tracer: tracer.clone(),
            started,
            config: config_rx.clone(),
            log: log.clone(),
            shutdown: shutdown_tx,
        },
    )?;
    tracing::info!(addr = %admin_addr, "admin server listening");

    let mut inbound = Inbound::new(
        listener_metrics,
        Recorders { access_log, tracer: tracer.clone(), board },
        files.clone(),
        drain_watch.clone(),
    );
    inbound.apply(&config)?;
    let mut shipping = logship::Slot::new(logship_metrics, files.clone());
    shipping.apply(config.logship.as_ref(), config.shutdown.drain_timeout).await?;
    // Config-change notifications follow the running config, as the health checker does.
    notify::start(config_rx.clone(), files.clone(), notify_metrics, drain_watch.clone())
        .context("starting config-change notifications")?;
    inbound_ready.set(true);
    tokio::spawn(health::run(config_rx, app_ready, app_ready_gauge, drain_watch));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Without a file to reload (`sidecar demo`) the sender is kept here instead, so that what
    // follows the config (health checks, config-change notifications) runs on the first one
    // rather than seeing the channel close and stopping.
    let (mut reloader, _unreloadable) = match path {
        Some(p) => (Some(Reloader::new(p, config_tx, reload_metrics, log, &files)), None),
        None => (None, Some(config_tx)),
    };

    let why = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = shutdown_rx.recv() => break "POST /shutdown",
            _ = sighup.recv() => {
                if let Some(r) = &mut reloader {
                    tracing::info!("SIGHUP: reloading the config");
                    r.reload(&mut inbound, &mut shipping).await;
                }
            }
            true = reload::file_changed(&mut reloader) => {
                if let Some(r) = &mut reloader {
                    tracing::info!(file = %r.path().display(), "config file changed: reloading");
                    r.reload(&mut inbound, &mut shipping).await;
                }
            }
        }
    };

    let shutdown = reloader.as_ref().map_or(&config.shutdown, |r| &r.current().shutdown).clone();
    let drain_timeout = shutdown.drain_timeout;
    readiness.set_draining();
    // Kubernetes removes the pod from its Services' endpoints while it sends SIGTERM, but
    // kube-proxy, ingress controllers and cloud load balancers learn of it seconds later and
    // keep sending until then: closing the listeners now would refuse that traffic. So first
    // only `/ready` says 503, for `drain_delay` (the preStop sleep, built in); the drain's
    // timeout starts after it, as Envoy's drain time follows Istio's preStop wait.
    if !shutdown.drain_delay.is_zero() {
        tracing::info!(signal = why, delay = ?shutdown.drain_delay, "not ready; serving on until the drain begins");
        let forced = tokio::select! {
            _ = tokio::time::sleep(shutdown.drain_delay) => false,
            _ = sigterm.recv() => true,
            _ = sigint.recv() => true,
        };
        if forced {
            tracing::warn!("second signal during drain_delay: exiting now");
            return Ok(Exit::Forced);
        }
    }
    tracing::info!(signal = why, timeout = ?drain_timeout, "draining: not ready, no new connections, finishing requests in flight");
    drain.start();
    // The shipper sends what it read and checkpoints while the proxy drains, side by side.
    let shipped = tokio::task::spawn_blocking(move || shipping.stop(drain_timeout));
    files.stop();
    // Our own handles would keep the drain waiting for ever.
    drop(inbound);
    drop(reloader);

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
    } else {
        let _ = shipped.await;
        // The spans of the requests the drain finished.
        let flush = tracer.clone();
        let _ = tokio::task::spawn_blocking(move || flush.shutdown(SPAN_FLUSH)).await;
    }
    Ok(exit)
}
