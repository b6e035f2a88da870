//! The shared registry and its exposition in both text formats. Each module registers its
//! own families on the registry at start (`InboundMetrics::register`, the access log, span
//! export, health, the reloader), so nothing here grows with every feature; the latency
//! histograms are kept apart (`telemetry::histogram`) and written beside it.

use std::sync::Arc;

use prometheus_client::registry::Registry;

use super::histogram::HistogramFamily;
use super::process::ProcessCollector;

/// The registry every family is registered on, with the public `sidecar_` prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("sidecar")
}

/// The text formats a scrape may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what Prometheus asks for by default and promtool checks.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

/// Everything a scrape shows: the `process_*` families, the registry's, the latency
/// histograms.
pub struct Exposition {
    registry: Arc<Registry>,
    process: Registry,
    histograms: Vec<Arc<HistogramFamily>>,
}

impl Exposition {
    pub fn new(
        registry: Arc<Registry>,
        histograms: Vec<Arc<HistogramFamily>>,
        started: std::time::SystemTime,
    ) -> Self {
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector::new(started)));
        Exposition { registry, process, histograms }
    }

    pub fn encode(&self, format: Format, out: &mut String) -> std::fmt::Result {
        // prometheus-client writes OpenMetrics; `encode_registry` leaves out the `# EOF`,
        // which goes once, after the last family.
        let mut om = String::with_capacity(32 * 1024);
        prometheus_client::encoding::text::encode_registry(&mut om, &self.process)?;
        prometheus_client::encoding::text::encode_registry(&mut om, &self.registry)?;
        match format {
            Format::OpenMetrics => out.push_str(&om),
            Format::Prometheus => to_prometheus(&om, out),
        }
        for h in &self.histograms {
            h.encode(format == Format::OpenMetrics, out)?;
        }
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
        Ok(())
    }
}

/// OpenMetrics text as the Prometheus 0.0.4 format. The two differ, for what we write, in
/// the family names of counters (OpenMetrics names the family `x` and its sample
/// `x_total`; 0.0.4 has no such split, so `# TYPE x counter` would leave `x_total` untyped),
/// in `# UNIT` and `# EOF` (not in 0.0.4), and in exemplars (OpenMetrics only).
fn to_prometheus(om: &str, out: &mut String) {
    out.reserve(om.len());
    // A family's `# HELP` comes before its `# TYPE`: held until the type says its name.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gaugehistogram" => ("", "histogram"),
                "unknown" | "stateset" => ("", "untyped"),
                k => ("", k),
            };
            if let Some((_, text)) = help.take() {
                push_line(out, &["# HELP ", name, suffix, " ", text]);
            }
            push_line(out, &["# TYPE ", name, suffix, " ", kind]);
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        // Exemplars follow a sample as ` # {...} value [timestamp]`.
        let sample = line.find(" # {").map_or(line, |i| &line[..i]);
        push_line(out, &[sample]);
    }
}

fn push_line(out: &mut String, parts: &[&str]) {
    for p in parts {
        out.push_str(p);
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    fn exposition(r: Registry, format: Format) -> String {
        let mut out = String::new();
        let h = HistogramFamily::new("sidecar_x_duration_seconds", "Test");
        h.get_or_create(vec![("listener", "web".into())])
            .observe(std::time::Duration::from_millis(3), Some(7));
        Exposition::new(Arc::new(r), vec![h], std::time::SystemTime::now()).encode(format, &mut out).unwrap();
        out
    }

    #[test]
    fn histograms_come_before_the_one_eof() {
        let out = exposition(registry(), Format::OpenMetrics);
        assert!(out.contains("# TYPE sidecar_x_duration_seconds histogram\n"), "{out}");
        assert!(out.contains("# {trace_id=\"00000000000000000000000000000007\"}"), "{out}");
        assert_eq!(out.matches("# EOF").count(), 1);
        assert!(out.ends_with("sidecar_x_duration_seconds_count{listener=\"web\"} 1\n# EOF\n"), "{out}");
    }

    #[test]
    fn prometheus_format_names_counter_families_with_total() {
        let mut r = registry();
        let c = Counter::<u64>::default();
        r.register("things", "Things seen", c.clone());
        c.inc();
        let om = exposition(r, Format::OpenMetrics);
        assert!(om.contains("# TYPE sidecar_things counter\n"), "{om}");
        let mut r = registry();
        r.register("things", "Things seen", c);
        let text = exposition(r, Format::Prometheus);
        assert!(text.contains("# HELP sidecar_things_total Things seen.\n"), "{text}");
        assert!(text.contains("# TYPE sidecar_things_total counter\nsidecar_things_total 1\n"), "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(!text.contains("# EOF"));
    }
}
