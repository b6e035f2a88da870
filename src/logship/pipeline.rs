//! The shipper's loop: read a chunk, hand it to every sink, and move the checkpoint once
//! every sink is done with it.
//!
//! Backpressure is the channels: each sink's holds a few chunks, and a full one makes the
//! loop wait (reading pauses, the file is the buffer), unless the sink is `drop_newest`.
//! Memory is bounded by sinks × (queue + one batch) × chunk size, whatever the sinks do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::acks::Acks;
use super::checkpoint::Writer;
use super::metrics::SinkMetrics;
use super::record::Chunk;
use super::tail::{CHUNK_BYTES, Progress, Tail};
use crate::config::logship::WhenFull;

/// How long an idle loop sleeps before looking at the files again.
const POLL: Duration = Duration::from_millis(100);
/// After the drain deadline, how long a request in flight may still take to be answered.
const HALT_GRACE: Duration = Duration::from_secs(1);
/// How often the files and lag gauges are brought up to date between scans.
const GAUGES: Duration = Duration::from_millis(250);
/// Chunks waiting for each sink: with 1 MiB chunks, 4 MiB a sink.
pub const QUEUE_CHUNKS: usize = 4;

/// A running sink as the loop sees it.
pub struct SinkHandle {
    pub tx: mpsc::Sender<Arc<Chunk>>,
    pub when_full: WhenFull,
    pub metrics: SinkMetrics,
    pub task: tokio::task::JoinHandle<()>,
}

/// The loop's parts.
pub struct Pipeline {
    pub tail: Tail,
    pub sinks: Vec<SinkHandle>,
    pub acks: Arc<Acks>,
    pub progress: Arc<Mutex<Progress>>,
    pub writer: Writer,
    pub scan_interval: Duration,
    /// Set to the drain deadline when the shipper is to stop.
    pub stop: watch::Receiver<Option<std::time::Instant>>,
    /// Tells the sinks the deadline passed.
    pub halt: watch::Sender<bool>,
}

impl Pipeline {
    pub async fn run(mut self) {
        let mut seq = 0u64;
        let mut chunk = Chunk::default();
        let mut next_scan = Instant::now();
        let mut next_gauges = Instant::now();
        let mut stopped = false;
        while !stopped {
            if self.stop.borrow().is_some() {
                break;
            }
            if Instant::now() >= next_scan {
                self.tail.scan(&mut chunk);
                self.tail.sizes_into(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()));
                next_scan = Instant::now() + self.scan_interval;
            }
            let read = self.tail.read(&mut chunk);
            let idle = !read && (!chunk.entries.is_empty() || !chunk.ends.is_empty());
            if chunk.text.len() >= CHUNK_BYTES || idle {
                seq += 1;
                stopped = !self.dispatch(std::mem::take(&mut chunk), seq).await;
            }
            self.save();
            // The lag gauge follows deliveries, not only scans.
            if Instant::now() >= next_gauges {
                self.tail.gauges();
                next_gauges = Instant::now() + GAUGES;
            }
            if read {
                // Let the sinks' tasks send what they have (one thread runs them all).
                tokio::task::yield_now().await;
            } else if !stopped {
                tokio::select! {
                    _ = self.stop.changed() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        }
        let deadline = (*self.stop.borrow()).unwrap_or_else(std::time::Instant::now);
        self.finish(chunk, seq, deadline.into()).await;
    }

    /// Hands `chunk` to every sink; false if the shipper was told to stop while waiting for
    /// room (the chunk then stays unacknowledged and is read again after a restart).
    async fn dispatch(&mut self, mut chunk: Chunk, seq: u64) -> bool {
        chunk.seq = seq;
        let ends = std::mem::take(&mut chunk.ends);
        let records = chunk.entries.len() as u64;
        let chunk = Arc::new(chunk);
        self.acks.register(chunk.clone(), ends);
        for (k, sink) in self.sinks.iter().enumerate() {
            match sink.when_full {
                WhenFull::Block => loop {
                    tokio::select! {
                        r = sink.tx.reserve() => {
                            match r {
                                Ok(permit) => permit.send(chunk.clone()),
                                Err(_) => self.acks.skip(k, seq),
                            }
                            break;
                        }
                        _ = self.stop.changed() => return false,
                        _ = tokio::time::sleep(self.scan_interval) => self.tail.refresh(),
                    }
                },
                WhenFull::DropNewest => match sink.tx.try_send(chunk.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        sink.metrics.dropped.inc_by(records);
                        self.acks.skip(k, seq);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => self.acks.skip(k, seq),
                },
            }
        }
        true
    }

    /// Offers the checkpoint to its writer when it moved (a busy writer gets it next time).
    fn save(&self) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.changed && self.writer.offer(p.snapshot()) {
            p.changed = false;
        }
    }

    /// The stop: what was read goes to the sinks, which send until they are done or the
    /// deadline passes; then the checkpoint is written. An incomplete last line or a pending
    /// multi-line event is not sent: the checkpoint stays before it and the next start reads
    /// it whole.
    async fn finish(mut self, chunk: Chunk, mut seq: u64, deadline: Instant) {
        if !chunk.entries.is_empty() || !chunk.ends.is_empty() {
            seq += 1;
            let _ = tokio::time::timeout_at(deadline, self.dispatch_final(chunk, seq)).await;
        }
        let mut tasks: Vec<_> = self
            .sinks
            .drain(..)
            .map(|s| {
                drop(s.tx);
                s.task
            })
            .collect();
        for task in &mut tasks {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        if tasks.iter().any(|t| !t.is_finished()) {
            tracing::warn!(
                "log shipping: drain timeout reached with lines still unsent; they are sent after the restart"
            );
            // A request in flight may still get its answer (else it is sent again after the
            // restart: a duplicate); nothing new is started.
            self.halt.send_replace(true);
            for task in &mut tasks {
                if tokio::time::timeout(HALT_GRACE, &mut *task).await.is_err() {
                    task.abort();
                }
            }
        }
        let marks = {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            self.tail.sizes_into(&mut p);
            p.snapshot()
        };
        self.writer.finish(marks);
    }

    /// `dispatch` without the stop signal (it has fired): only the deadline cuts it short.
    async fn dispatch_final(&mut self, mut chunk: Chunk, seq: u64) {
        chunk.seq = seq;
        let ends = std::mem::take(&mut chunk.ends);
        let chunk = Arc::new(chunk);
        self.acks.register(chunk.clone(), ends);
        for (k, sink) in self.sinks.iter().enumerate() {
            if sink.tx.send(chunk.clone()).await.is_err() {
                self.acks.skip(k, seq);
            }
        }
    }
}
