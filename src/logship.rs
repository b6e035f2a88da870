//! Log shipping: tails the app's log files on a shared volume and delivers every line, at
//! least once, to HTTP (NDJSON), Loki, Elasticsearch or OTLP receivers.
//!
//! The shipper runs on a thread of its own with its own single-threaded runtime, so reading
//! files and encoding batches never takes a proxy worker. The life of a line: `tail` finds
//! and reads the file into a chunk, `lines` cuts it into records, `pipeline` hands the chunk
//! to every `sink`, each sink batches, encodes (`format`) and sends it with its `client`, and
//! once every sink is done with a chunk the `checkpoint` moves past it.

mod acks;
pub mod checkpoint;
mod client;
pub mod doc;
pub mod format;
mod lines;
pub mod metrics;
mod pipeline;
pub mod record;
mod sink;
mod tail;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use self::acks::Acks;
pub use self::metrics::Metrics;
use self::pipeline::{Pipeline, QUEUE_CHUNKS, SinkHandle};
use self::record::SourceInfo;
use self::tail::{Progress, Source, Tail};
use crate::config::logship::{CpuPriority, LogshipConfig, LokiEncoding, SinkConfig, SinkKind, SourceFormat};
use crate::files::FileWatcher;

/// The pod's identity as the downward API gives it (`env: [{ name: POD_NAME, valueFrom:
/// { fieldRef: { fieldPath: metadata.name } } }]`), as OpenTelemetry's resource keys.
const POD_ENV: [(&str, &str); 4] = [
    ("POD_NAMESPACE", "k8s.namespace.name"),
    ("POD_NAME", "k8s.pod.name"),
    ("CONTAINER_NAME", "k8s.container.name"),
    ("NODE_NAME", "k8s.node.name"),
];

#[derive(Debug, thiserror::Error)]
pub enum LogshipError {
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("sink {sink}: {source}")]
    Sink { sink: String, source: client::ClientError },
    #[error("starting the log shipper: {0}")]
    Start(std::io::Error),
}

/// A running shipper. Dropping it without `stop` leaves the thread running until exit.
pub struct Shipper {
    stop: watch::Sender<Option<Instant>>,
    thread: Option<std::thread::JoinHandle<()>>,
    config: LogshipConfig,
}

impl Shipper {
    /// Loads the checkpoint, connects nothing yet, and starts reading. Errors (an unreadable
    /// checkpoint directory, a token file that is missing, bad TLS files) come back here.
    pub fn start(
        config: &LogshipConfig,
        metrics: &Metrics,
        files: &FileWatcher,
    ) -> Result<Shipper, LogshipError> {
        let restored = checkpoint::load(&config.checkpoint_dir)?;
        let (stop, stop_rx) = watch::channel(None);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (cfg, metrics, files) = (config.clone(), metrics.clone(), files.clone());
        let thread = std::thread::Builder::new()
            .name("sidecar-logship".into())
            .spawn(move || {
                if cfg.cpu_priority == CpuPriority::Idle {
                    lower_priority();
                }
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(LogshipError::Start(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match assemble(&cfg, &metrics, &files, restored, stop_rx) {
                        Ok(p) => {
                            let _ = ready_tx.send(Ok(()));
                            p.run().await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(LogshipError::Start)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(LogshipError::Start(std::io::Error::other("the shipper thread ended at start")));
            }
        }
        let sources: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
        let sinks: Vec<&str> = config.sinks.iter().map(|s| s.name.as_str()).collect();
        tracing::info!(?sources, ?sinks, checkpoint_dir = %config.checkpoint_dir.display(), "log shipping started");
        Ok(Shipper { stop, thread: Some(thread), config: config.clone() })
    }

    pub fn config(&self) -> &LogshipConfig {
        &self.config
    }

    /// Stops reading, sends what was read for at most `timeout`, writes the checkpoint, and
    /// returns when that is done. Blocks: call it off the proxy's workers.
    pub fn stop(mut self, timeout: Duration) {
        self.stop.send_replace(Some(Instant::now() + timeout));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `check` can know before `run` beyond the config itself: the sinks' TLS files load.
pub fn check_files(
    file: &std::path::Path,
    config: &crate::config::Config,
) -> Result<(), crate::config::ConfigError> {
    use crate::config::{ConfigError, Problem};
    let problems: Vec<Problem> = config
        .logship
        .iter()
        .flat_map(|l| l.sinks.iter())
        .enumerate()
        .filter_map(|(i, s)| {
            let e = crate::tls::client::check(s.tls.as_ref()?).err()?;
            Some(Problem { path: format!("logship.sinks[{i}].tls"), message: e.to_string() })
        })
        .collect();
    if problems.is_empty() { Ok(()) } else { Err(ConfigError { file: file.to_owned(), problems }) }
}

/// Puts this thread in `SCHED_IDLE`: it runs only when the proxy's threads do not want the
/// CPU, so a burst of log lines never delays a request on a sidecar's small CPU share.
fn lower_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        tracing::warn!(error = ?e, "cannot lower the log shipper's CPU priority; it competes with the proxy as an equal");
    }
}

/// Builds the pipeline inside the shipper's runtime (TLS rotation and sinks are its tasks).
fn assemble(
    cfg: &LogshipConfig,
    metrics: &Metrics,
    files: &FileWatcher,
    restored: Option<Vec<checkpoint::Mark>>,
    stop: watch::Receiver<Option<Instant>>,
) -> Result<Pipeline, LogshipError> {
    let pod: Vec<(String, String)> = POD_ENV
        .iter()
        .filter_map(|(env, key)| {
            std::env::var(env).ok().filter(|v| !v.is_empty()).map(|v| ((*key).to_owned(), v))
        })
        .collect();
    let sources = cfg
        .sources
        .iter()
        .map(|s| {
            let mut fields: Vec<(String, String)> =
                s.fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            fields.extend(pod.iter().filter(|(k, _)| !s.fields.contains_key(k)).cloned());
            let info =
                Arc::new(SourceInfo { name: s.name.clone(), fields, json: s.format == SourceFormat::Json });
            // Validated with the config: cannot fail here.
            let multiline =
                s.multiline.as_ref().and_then(|m| regex::bytes::Regex::new(&m.start_pattern).ok());
            let timeout = s.multiline.as_ref().map_or(Duration::MAX, |m| m.timeout);
            Source {
                name: s.name.clone(),
                paths: s.paths.clone(),
                exclude: s.exclude.iter().filter_map(|p| glob::Pattern::new(p).ok()).collect(),
                shape: lines::Shape::new(info, multiline, timeout, s.max_line_bytes as usize),
                metrics: metrics.source(&s.name),
            }
        })
        .collect();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let acks = Acks::new(progress.clone(), cfg.sinks.len());
    let (halt, halted) = watch::channel(false);
    let mut sinks = Vec::new();
    for (id, s) in cfg.sinks.iter().enumerate() {
        let client = client::Client::new(s, files)
            .map_err(|source| LogshipError::Sink { sink: s.name.clone(), source })?;
        let m = metrics.sink(&s.name);
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        let sink = sink::Sink::new(
            id,
            s.clone(),
            wire_format(s, &pod),
            client,
            m.clone(),
            acks.clone(),
            halted.clone(),
        );
        let task = tokio::spawn(sink.run(rx));
        sinks.push(SinkHandle { tx, when_full: s.when_full, metrics: m, task });
    }
    let writer = checkpoint::Writer::start(cfg.checkpoint_dir.clone()).map_err(LogshipError::Start)?;
    Ok(Pipeline {
        tail: Tail::new(cfg, sources, restored, progress.clone()),
        sinks,
        acks,
        progress,
        writer,
        scan_interval: cfg.scan_interval,
        stop,
        halt,
    })
}

fn wire_format(s: &SinkConfig, pod: &[(String, String)]) -> Box<dyn format::Format> {
    match s.kind {
        SinkKind::Http => Box::new(format::http::Ndjson),
        SinkKind::Loki => Box::new(format::loki::Loki::new(
            s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            s.encoding == LokiEncoding::Json,
        )),
        SinkKind::Elasticsearch => Box::new(format::elasticsearch::Elasticsearch::new(s.index.clone())),
        SinkKind::Otlp => {
            let service = s
                .service_name
                .clone()
                .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
                .or_else(|| pod.iter().find(|(k, _)| k == "k8s.container.name").map(|(_, v)| v.clone()))
                .unwrap_or_else(|| "unknown_service".to_owned());
            Box::new(format::otlp::Otlp::new(vec![("service.name".to_owned(), service)]))
        }
    }
}

/// The shipper a config asks for, if any, swapped whole when a reload changes `logship`.
pub struct Slot {
    shipper: Option<Shipper>,
    metrics: Metrics,
    files: FileWatcher,
}

impl Slot {
    pub fn new(metrics: Metrics, files: FileWatcher) -> Slot {
        Slot { shipper: None, metrics, files }
    }

    /// Runs what `config` asks for. A change stops the running shipper (it sends what it read
    /// for at most `drain`, then checkpoints) and starts the new one from that checkpoint: no
    /// line lost or sent twice. If the new one cannot start, the old config runs again.
    pub async fn apply(
        &mut self,
        config: Option<&LogshipConfig>,
        drain: Duration,
    ) -> Result<(), LogshipError> {
        if self.shipper.as_ref().map(Shipper::config) == config {
            return Ok(());
        }
        let old = self.shipper.take();
        let old_config = old.as_ref().map(|s| s.config().clone());
        if let Some(old) = old {
            let _ = tokio::task::spawn_blocking(move || old.stop(drain)).await;
        }
        let Some(config) = config else { return Ok(()) };
        match self.start(config).await {
            Ok(s) => {
                self.shipper = Some(s);
                Ok(())
            }
            Err(e) => {
                if let Some(old) = old_config {
                    self.shipper = self.start(&old).await.ok();
                }
                Err(e)
            }
        }
    }

    async fn start(&self, config: &LogshipConfig) -> Result<Shipper, LogshipError> {
        let (config, metrics, files) = (config.clone(), self.metrics.clone(), self.files.clone());
        tokio::task::spawn_blocking(move || Shipper::start(&config, &metrics, &files))
            .await
            .unwrap_or_else(|e| Err(LogshipError::Start(std::io::Error::other(e.to_string()))))
    }

    /// Stops the shipper (blocking; see [`Shipper::stop`]).
    pub fn stop(self, drain: Duration) {
        if let Some(s) = self.shipper {
            s.stop(drain);
        }
    }
}
