//! `process_*` metrics as Prometheus's client libraries name them (CPU, memory, file
//! descriptors, start time), read from /proc at each scrape: nothing is kept between scrapes,
//! and the request path never sees them.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second in /proc/self/stat: USER_HZ, 100 on every Linux ABI (the
/// Prometheus Go client assumes the same).
const USER_HZ: f64 = 100.0;

#[derive(Debug)]
pub struct ProcessCollector {
    /// When the process started, as Unix seconds.
    started: f64,
}

impl ProcessCollector {
    pub fn new(started: SystemTime) -> Self {
        ProcessCollector { started: started.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()) }
    }
}

/// User plus system CPU seconds from /proc/self/stat (fields 14 and 15, after the command
/// name, which may itself hold spaces and parentheses).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// `VmRSS` and `VmSize` from /proc/self/status, in bytes.
fn memory() -> Option<(i64, i64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<i64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse::<i64>().ok().map(|k| k * 1024)
    };
    Some((kib("VmRSS:")?, kib("VmSize:")?))
}

fn open_fds() -> Option<i64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = cpu_seconds() {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
        }
        let mut gauge = |name: &str, help: &str, v: f64| -> Result<(), std::fmt::Error> {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m)
        };
        if let Some((rss, vsize)) = memory() {
            gauge("process_resident_memory_bytes", "Resident memory size in bytes", rss as f64)?;
            gauge("process_virtual_memory_bytes", "Virtual memory size in bytes", vsize as f64)?;
        }
        if let Some(fds) = open_fds() {
            gauge("process_open_fds", "Number of open file descriptors", fds as f64)?;
        }
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            gauge("process_max_fds", "Maximum number of open file descriptors", soft as f64)?;
        }
        gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.started,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_is_read() {
        assert!(cpu_seconds().is_some());
        let (rss, vsize) = memory().unwrap();
        assert!(rss > 0 && vsize >= rss);
        assert!(open_fds().unwrap() > 2);
    }
}
