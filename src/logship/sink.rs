//! One sink's task: takes chunks in order, sends them in batches (by count, bytes and time),
//! retries with backoff and jitter (or after `Retry-After`), writes what is refused for good
//! to the dead-letter file, and tells the pipeline which chunks it is done with.
//!
//! Requests go one at a time, so a sink is done with chunks in reading order and the
//! checkpoint never passes a line that is still to be retried.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio::sync::{mpsc, watch};

use super::acks::Acks;
use super::client::Client;
use super::format::{self, Format, Verdict};
use super::metrics::SinkMetrics;
use super::record::{Chunk, Record};
use crate::config::logship::{Compression, SinkConfig};
use crate::telemetry::access_log::format::{Stamps, string};

/// A dead-letter file is rotated at this size; one old file is kept.
const DEAD_LETTER_MAX: u64 = 64 << 20;
/// A `Retry-After` longer than this is taken as this: a receiver's bad clock must not stall
/// shipping for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

pub struct Sink {
    pub name: String,
    /// This sink's number in `Acks`.
    id: usize,
    cfg: SinkConfig,
    format: Box<dyn Format>,
    client: Client,
    metrics: SinkMetrics,
    acks: Arc<Acks>,
    dead: DeadLetter,
    /// Chunks taken from the channel, oldest first, and the next record to send in them
    /// (chunk index in the queue, record index).
    queue: VecDeque<Arc<Chunk>>,
    cursor: (usize, usize),
    /// Set when the shipper's drain deadline passed: the request in flight may finish (its
    /// answer saves a duplicate), nothing new starts and no retry waits.
    halt: watch::Receiver<bool>,
    /// Failures in a row: the backoff grows with them, and the log says only the first.
    failures: u32,
}

impl Sink {
    pub fn new(
        id: usize,
        cfg: SinkConfig,
        format: Box<dyn Format>,
        client: Client,
        metrics: SinkMetrics,
        acks: Arc<Acks>,
        halt: watch::Receiver<bool>,
    ) -> Sink {
        Sink {
            id,
            halt,
            name: cfg.name.clone(),
            dead: DeadLetter { path: cfg.dead_letter.clone(), file: None },
            cfg,
            format,
            client,
            metrics,
            acks,
            queue: VecDeque::new(),
            cursor: (0, 0),
            failures: 0,
        }
    }

    /// Runs until the channel is closed and everything taken from it is done.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Arc<Chunk>>) {
        let mut open = true;
        loop {
            if *self.halt.borrow() {
                return;
            }
            if self.queue.is_empty() {
                if !open {
                    return;
                }
                match rx.recv().await {
                    Some(c) => self.queue.push_back(c),
                    None => return,
                }
            }
            // Wait for a full batch, at most `batch.timeout` from now; a closed channel (the
            // shipper stopping) sends what there is at once.
            let deadline = tokio::time::Instant::now() + self.cfg.batch_timeout;
            while open && !self.batch_full() {
                tokio::select! {
                    c = rx.recv() => match c {
                        Some(c) => self.queue.push_back(c),
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let batch = self.take_batch();
            if !batch.is_empty() && !self.deliver(batch).await {
                return;
            }
            self.release_done();
        }
    }

    /// Records and bytes queued and not yet sent, counted up to a batch's worth.
    fn pending(&self) -> (usize, usize) {
        let (mut events, mut bytes) = (0, 0);
        for (k, c) in self.queue.iter().enumerate().skip(self.cursor.0) {
            let from = if k == self.cursor.0 { self.cursor.1.min(c.entries.len()) } else { 0 };
            events += c.entries.len() - from;
            bytes += c.entries[from..].iter().map(|e| e.range.len()).sum::<usize>();
            if events >= self.cfg.max_events || bytes >= self.cfg.max_bytes {
                break;
            }
        }
        (events, bytes)
    }

    fn batch_full(&self) -> bool {
        let (events, bytes) = self.pending();
        events >= self.cfg.max_events || bytes >= self.cfg.max_bytes
    }

    /// The next batch, oldest first, as (chunk index in the queue, record index); the cursor
    /// moves past it.
    fn take_batch(&mut self) -> Vec<(usize, usize)> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let (mut k, mut i) = self.cursor;
        while k < self.queue.len() && batch.len() < self.cfg.max_events {
            let c = &self.queue[k];
            if i >= c.entries.len() {
                if k + 1 == self.queue.len() {
                    break;
                }
                k += 1;
                i = 0;
                continue;
            }
            let len = c.entries[i].range.len();
            if !batch.is_empty() && bytes + len > self.cfg.max_bytes {
                break;
            }
            bytes += len;
            batch.push((k, i));
            i += 1;
        }
        self.cursor = (k, i);
        batch
    }

    /// Chunks wholly sent leave the queue, and `Acks` hears how far this sink has got.
    fn release_done(&mut self) {
        let mut last = None;
        while let Some(front) = self.queue.front() {
            let (k, i) = self.cursor;
            if k == 0 && i < front.entries.len() {
                break;
            }
            last = Some(front.seq);
            self.queue.pop_front();
            self.cursor = if k == 0 { (0, 0) } else { (k - 1, i) };
        }
        let at = match (self.queue.front(), last) {
            (Some(front), _) => (front.seq, self.cursor.1),
            (None, Some(seq)) => (seq + 1, 0),
            (None, None) => return,
        };
        self.acks.reached(self.id, at.0, at.1);
    }

    /// Sends `batch` until every record in it is delivered, refused for good, or rejected.
    /// Retries never end on their own: reading waits meanwhile (backpressure), and the
    /// shipper's stop cuts them short at the drain deadline.
    /// Returns false if the shipper halted first (the batch stays undelivered).
    async fn deliver(&mut self, batch: Vec<(usize, usize)>) -> bool {
        let mut todo = batch;
        let mut body = Vec::new();
        while !todo.is_empty() {
            body.clear();
            {
                let records: Vec<Record<'_>> = todo.iter().map(|&(k, i)| self.queue[k].record(i)).collect();
                self.format.encode(&records, &mut body);
            }
            let encoding = match (self.format.content_encoding(), self.cfg.compression) {
                (Some(e), _) => Some(e),
                (None, Compression::Gzip) => {
                    body = gzip(&body);
                    Some("gzip")
                }
                (None, Compression::None) => None,
            };
            let verdict =
                match self.client.post(std::mem::take(&mut body), self.format.content_type(), encoding).await
                {
                    Err(reason) => Verdict::RetryAll { reason, after: None },
                    Ok(a) if (200..300).contains(&a.status) => self.format.verdict(&a.body, todo.len()),
                    Ok(a) => {
                        let after = a
                            .retry_after
                            .as_deref()
                            .and_then(|v| format::retry_after(v, std::time::SystemTime::now()));
                        format::status_verdict(a.status, &a.body, after)
                    }
                };
            if *self.halt.borrow() {
                // The answer is in: what it says is done is done, the rest waits for the next start.
                return self.judge_final(todo, verdict);
            }
            todo = self.judge(todo, verdict).await;
        }
        true
    }

    /// A verdict after the halt: only a full delivery counts, and nothing is retried.
    fn judge_final(&mut self, todo: Vec<(usize, usize)>, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Delivered => {
                self.metrics.lines_sent.inc_by(todo.len() as u64);
                true
            }
            _ => false,
        }
    }

    /// Acts on a verdict; returns what is left to send.
    async fn judge(&mut self, todo: Vec<(usize, usize)>, verdict: Verdict) -> Vec<(usize, usize)> {
        let n = todo.len() as u64;
        match verdict {
            Verdict::Delivered => {
                self.metrics.lines_sent.inc_by(n);
                self.recovered();
                Vec::new()
            }
            Verdict::RefuseAll { reason } => {
                self.metrics.send_errors.inc();
                self.refuse(&todo, &reason);
                Vec::new()
            }
            Verdict::Rejected { count, reason } => {
                tracing::warn!(sink = %self.name, rejected = count, reason = %reason, "the receiver rejected part of a batch (partial success); those lines are not sent again");
                self.metrics.lines_sent.inc_by(n.saturating_sub(count));
                self.metrics.dead_letter.inc_by(count.min(n));
                self.recovered();
                Vec::new()
            }
            Verdict::RetryAll { reason, after } => {
                self.metrics.send_errors.inc();
                self.backoff(&reason, after).await;
                todo
            }
            Verdict::Partial { retry, refused } => {
                self.metrics.send_errors.inc();
                let delivered = n - retry.len() as u64 - refused.len() as u64;
                self.metrics.lines_sent.inc_by(delivered);
                for (reason, group) in group_by_reason(&refused) {
                    let items: Vec<(usize, usize)> =
                        group.iter().filter_map(|&j| todo.get(j).copied()).collect();
                    self.refuse(&items, reason);
                }
                let again: Vec<(usize, usize)> = retry.iter().filter_map(|&j| todo.get(j).copied()).collect();
                if !again.is_empty() {
                    self.backoff(&format!("{} of {} records to retry", again.len(), n), None).await;
                }
                again
            }
        }
    }

    fn refuse(&mut self, items: &[(usize, usize)], reason: &str) {
        tracing::warn!(sink = %self.name, lines = items.len(), reason, path = %self.dead.path.display(), "lines refused for good: written to the dead-letter file");
        self.metrics.dead_letter.inc_by(items.len() as u64);
        let records: Vec<Record<'_>> = items.iter().map(|&(k, i)| self.queue[k].record(i)).collect();
        self.dead.write(&self.name, reason, &records);
    }

    fn recovered(&mut self) {
        if self.failures > 0 {
            tracing::info!(sink = %self.name, failures = self.failures, "sink delivering again");
        }
        self.failures = 0;
    }

    /// Waits before the next try: `Retry-After` when the receiver gave one, else an
    /// exponential backoff with full jitter (AWS's advice: retries spread out instead of
    /// arriving together), capped at `max_backoff`.
    async fn backoff(&mut self, reason: &str, after: Option<Duration>) {
        self.failures += 1;
        let wait = match after {
            Some(a) => a.min(MAX_RETRY_AFTER),
            None => {
                let cap = self
                    .cfg
                    .initial_backoff
                    .saturating_mul(1 << self.failures.min(16))
                    .min(self.cfg.max_backoff);
                let lo = cap / 2;
                lo + (cap - lo).mul_f64(rand::rng().random::<f64>())
            }
        };
        // The first failure and then one in ten: a sink down for an hour is not a log flood.
        if self.failures == 1 || self.failures.is_multiple_of(10) {
            tracing::warn!(sink = %self.name, failures = self.failures, retry_in = ?wait, reason, "sending failed; will retry");
        }
        let until = Instant::now() + wait;
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = self.halt.changed() => {}
        }
    }
}

fn group_by_reason(refused: &[(usize, String)]) -> Vec<(&str, Vec<usize>)> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (j, reason) in refused {
        match groups.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, v)) => v.push(*j),
            None => groups.push((reason, vec![*j])),
        }
    }
    groups
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    e.write_all(body).expect("writing to a Vec cannot fail");
    e.finish().expect("writing to a Vec cannot fail")
}

/// A sink's refusals, appended as JSON lines: when, which sink, why, and the record.
struct DeadLetter {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl DeadLetter {
    fn write(&mut self, sink: &str, reason: &str, records: &[Record<'_>]) {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, lines = records.len(), "cannot open the dead-letter file; the refused lines are only counted");
                    return;
                }
            }
        }
        let mut out = Vec::with_capacity(records.len() * 256);
        let mut stamps = Stamps::default();
        let now = std::time::SystemTime::now();
        for r in records {
            out.extend_from_slice(b"{\"ts\":\"");
            stamps.write(&mut out, now);
            out.extend_from_slice(b"\",\"sink\":");
            string(&mut out, sink);
            out.extend_from_slice(b",\"reason\":");
            string(&mut out, reason);
            out.extend_from_slice(b",\"source\":");
            string(&mut out, &r.entry.source.name);
            out.extend_from_slice(b",\"file\":");
            string(&mut out, &r.entry.file.path);
            out.extend_from_slice(b",\"offset\":");
            out.extend_from_slice(itoa::Buffer::new().format(r.entry.offset).as_bytes());
            out.extend_from_slice(b",\"line\":");
            string(&mut out, &r.text());
            out.extend_from_slice(b"}\n");
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(&out)
        {
            tracing::error!(path = %self.path.display(), error = %e, "writing the dead-letter file failed");
            self.file = None;
        }
        // Bounded: a sink refusing everything for a week must not fill the volume. The full
        // file becomes `.1` (replacing the one before) and a new one starts.
        if let Some(f) = &self.file
            && f.metadata().is_ok_and(|m| m.len() >= DEAD_LETTER_MAX)
        {
            let old = self.path.with_extension("ndjson.1");
            if let Err(e) = std::fs::rename(&self.path, &old) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate the dead-letter file");
            }
            self.file = None;
        }
    }
}
