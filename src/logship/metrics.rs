//! `sidecar_logship_*`: registered once at start, shared by every shipper a reload builds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: String,
}

#[derive(Clone, Default)]
pub struct Metrics {
    lines_read: Family<SourceLabel, Counter>,
    truncated: Family<SourceLabel, Counter>,
    lost_bytes: Family<SourceLabel, Counter>,
    pending_bytes: Family<SourceLabel, Gauge>,
    files: Family<SourceLabel, Gauge>,
    lines_sent: Family<SinkLabel, Counter>,
    send_errors: Family<SinkLabel, Counter>,
    dead_letter: Family<SinkLabel, Counter>,
    dropped: Family<SinkLabel, Counter>,
}

/// One source's series.
#[derive(Clone)]
pub struct SourceMetrics {
    pub lines_read: Counter,
    pub truncated: Counter,
    pub lost_bytes: Counter,
    pub pending_bytes: Gauge,
    pub files: Gauge,
}

/// One sink's series.
#[derive(Clone)]
pub struct SinkMetrics {
    pub lines_sent: Counter,
    pub send_errors: Counter,
    pub dead_letter: Counter,
    pub dropped: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("logship");
        r.register("lines_read", "Lines (events) read from the app's log files", m.lines_read.clone());
        r.register("truncated", "Lines longer than max_line_bytes, cut there", m.truncated.clone());
        r.register(
            "lost_bytes",
            "Bytes of log files that were gone (deleted or truncated) before they were read",
            m.lost_bytes.clone(),
        );
        r.register(
            "pending_bytes",
            "Bytes in the source's files not yet delivered to every sink",
            m.pending_bytes.clone(),
        );
        r.register("files", "Files open for reading", m.files.clone());
        r.register("lines_sent", "Lines delivered to the sink", m.lines_sent.clone());
        r.register(
            "send_errors",
            "Requests to the sink that failed (each retry counts)",
            m.send_errors.clone(),
        );
        r.register(
            "dead_letter",
            "Lines the sink refused for good, written to its dead-letter file",
            m.dead_letter.clone(),
        );
        r.register(
            "dropped",
            "Lines skipped for the sink because its queue was full (when_full: drop_newest)",
            m.dropped.clone(),
        );
        m
    }

    pub fn source(&self, name: &str) -> SourceMetrics {
        let l = SourceLabel { source: name.to_owned() };
        SourceMetrics {
            lines_read: self.lines_read.get_or_create(&l).clone(),
            truncated: self.truncated.get_or_create(&l).clone(),
            lost_bytes: self.lost_bytes.get_or_create(&l).clone(),
            pending_bytes: self.pending_bytes.get_or_create(&l).clone(),
            files: self.files.get_or_create(&l).clone(),
        }
    }

    pub fn sink(&self, name: &str) -> SinkMetrics {
        let l = SinkLabel { sink: name.to_owned() };
        SinkMetrics {
            lines_sent: self.lines_sent.get_or_create(&l).clone(),
            send_errors: self.send_errors.get_or_create(&l).clone(),
            dead_letter: self.dead_letter.get_or_create(&l).clone(),
            dropped: self.dropped.get_or_create(&l).clone(),
        }
    }
}
