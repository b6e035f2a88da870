//! Latency histograms: lock-free to observe, with an exemplar per bucket (the trace id of a
//! recent sampled request that landed there), and their own exposition.
//!
//! prometheus-client's histogram takes a lock on every observation, and its exemplars
//! cannot be built outside the crate, so the latency families are kept here and written
//! beside the registry's text (`metrics::Exposition`): OpenMetrics gets the exemplars
//! (`# {trace_id="…"} 0.0123 1764750000.123`), the 0.0.4 format does not have them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Latency buckets in seconds, 0.5 ms to 10 s: a sidecar's own hop is under the first, the
/// apps behind it take 1 ms to seconds.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const SLOTS: usize = LATENCY_BUCKETS.len() + 1;

/// A bucket's exemplar is replaced at most this often: under load every request is sampled
/// at ratio 1.0, and one recent trace per bucket is all a dashboard links to.
const EXEMPLAR_EVERY_MS: u64 = 1000;

#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<HistInner>,
}

#[derive(Debug, Default)]
struct HistInner {
    buckets: [AtomicU64; SLOTS],
    sum_nanos: AtomicU64,
    exemplars: [ExemplarSlot; SLOTS],
}

#[derive(Debug, Default)]
struct ExemplarSlot {
    /// Unix milliseconds of the last exemplar stored (0: none yet).
    at_ms: AtomicU64,
    value: Mutex<Option<Exemplar>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Exemplar {
    trace_id: u128,
    seconds: f64,
    at: SystemTime,
}

/// A histogram's state at one moment: per-bucket (not cumulative) counts, the last one
/// above every bound, and the sum in seconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl LatencyHistogram {
    /// Counts one request; `trace_id` is its sampled trace, kept as the bucket's exemplar
    /// when the last one is older than a second.
    pub fn observe(&self, d: Duration, trace_id: Option<u128>) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        if let Some(trace_id) = trace_id {
            let slot = &self.inner.exemplars[i];
            let at = SystemTime::now();
            let ms = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            // Another worker storing one is as good as this one: never wait for it.
            if ms.saturating_sub(slot.at_ms.load(Ordering::Relaxed)) >= EXEMPLAR_EVERY_MS
                && let Ok(mut v) = slot.value.try_lock()
            {
                *v = Some(Exemplar { trace_id, seconds: secs, at });
                slot.at_ms.store(ms, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
            sum: self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    fn exemplar(&self, i: usize) -> Option<Exemplar> {
        *self.inner.exemplars[i].value.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A series' labels, in the order they are written (`[("listener", "web")]`).
pub type LabelPairs = Vec<(&'static str, String)>;

/// A latency family: one histogram per label set, created on first use.
#[derive(Debug)]
pub struct HistogramFamily {
    /// The full name (`sidecar_inbound_request_duration_seconds`).
    name: String,
    help: String,
    series: Mutex<Vec<(LabelPairs, LatencyHistogram)>>,
}

impl HistogramFamily {
    pub fn new(name: impl Into<String>, help: impl Into<String>) -> Arc<Self> {
        Arc::new(HistogramFamily { name: name.into(), help: help.into(), series: Mutex::default() })
    }

    /// The series for `labels`, made now if it is new.
    pub fn get_or_create(&self, labels: LabelPairs) -> LatencyHistogram {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, h)) = series.iter().find(|(l, _)| *l == labels) {
            return h.clone();
        }
        let h = LatencyHistogram::default();
        series.push((labels, h.clone()));
        h
    }

    /// The family in the text format: exemplars only in OpenMetrics.
    pub fn encode(&self, openmetrics: bool, out: &mut String) -> std::fmt::Result {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let name = &self.name;
        writeln!(out, "# HELP {name} {}.", self.help)?;
        writeln!(out, "# TYPE {name} histogram")?;
        if openmetrics {
            writeln!(out, "# UNIT {name} seconds")?;
        }
        for (labels, h) in &series {
            let mut prefix = String::new();
            for (k, v) in labels {
                write!(prefix, "{k}=\"{}\",", escape(v))?;
            }
            let snap = h.snapshot();
            let mut cumulative = 0;
            for (i, n) in snap.counts.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS.get(i).map_or_else(|| "+Inf".to_owned(), |b| float(*b));
                write!(out, "{name}_bucket{{{prefix}le=\"{le}\"}} {cumulative}")?;
                if openmetrics && let Some(e) = h.exemplar(i) {
                    let ts = e.at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                    write!(out, " # {{trace_id=\"{:032x}\"}} {} {ts:.3}", e.trace_id, e.seconds)?;
                }
                out.push('\n');
            }
            let labels = prefix.trim_end_matches(',');
            writeln!(out, "{name}_sum{{{labels}}} {}", snap.sum)?;
            writeln!(out, "{name}_count{{{labels}}} {cumulative}")?;
        }
        Ok(())
    }
}

/// A bound as Prometheus writes it: always with a decimal point (`1.0`, `0.0005`).
fn float(v: f64) -> String {
    if v.fract() == 0.0 { format!("{v:.1}") } else { v.to_string() }
}

/// Label values escape `\`, `"` and newlines (both formats).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family() -> (Arc<HistogramFamily>, LatencyHistogram) {
        let f = HistogramFamily::new("sidecar_x_duration_seconds", "Test");
        let h = f.get_or_create(vec![("listener", "web".into())]);
        (f, h)
    }

    #[test]
    fn buckets_are_cumulative_and_count_matches() {
        let (f, h) = family();
        h.observe(Duration::from_micros(300), None);
        h.observe(Duration::from_millis(3), None);
        h.observe(Duration::from_secs(60), None);
        let mut out = String::new();
        f.encode(false, &mut out).unwrap();
        for needle in [
            "# TYPE sidecar_x_duration_seconds histogram\n",
            "sidecar_x_duration_seconds_bucket{listener=\"web\",le=\"0.0005\"} 1\n",
            "sidecar_x_duration_seconds_bucket{listener=\"web\",le=\"0.005\"} 2\n",
            "sidecar_x_duration_seconds_bucket{listener=\"web\",le=\"1.0\"} 2\n",
            "sidecar_x_duration_seconds_bucket{listener=\"web\",le=\"+Inf\"} 3\n",
            "sidecar_x_duration_seconds_count{listener=\"web\"} 3\n",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
        assert!(!out.contains(" # {"), "no exemplars in the 0.0.4 format");
        assert_eq!(
            f.get_or_create(vec![("listener", "web".into())]).snapshot().counts.iter().sum::<u64>(),
            3
        );
    }

    #[test]
    fn a_sampled_request_is_its_buckets_exemplar_in_openmetrics() {
        let (f, h) = family();
        h.observe(Duration::from_millis(7), Some(0x4bf92f3577b34da6a3ce929d0e0e4736));
        // Within the second: the first exemplar stays.
        h.observe(Duration::from_millis(8), Some(1));
        let mut out = String::new();
        f.encode(true, &mut out).unwrap();
        let line = out.lines().find(|l| l.contains("le=\"0.01\"")).unwrap();
        assert!(
            line.starts_with(
                "sidecar_x_duration_seconds_bucket{listener=\"web\",le=\"0.01\"} 2 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.007 "
            ),
            "{line}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
