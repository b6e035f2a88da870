//! An access-log record as a line: JSON (the contract's fields) or text (a human's line).

use std::io::Write;

use http::Version;
use serde::Serialize;

use super::AccessRecord;

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    direction: &'a str,
    listener: &'a str,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    peer: String,
    peer_identity: Option<&'a str>,
    trace_id: Option<&'a str>,
    upstream: Option<&'a str>,
    error: Option<&'a str>,
}

fn path(r: &AccessRecord) -> &str {
    r.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

fn duration_ms(r: &AccessRecord) -> f64 {
    (r.duration.as_micros() as f64) / 1000.0
}

/// One JSON object and a newline, fields as INTERFACE.md lists them.
pub(super) fn json(out: &mut impl Write, r: &AccessRecord) -> std::io::Result<()> {
    let line = Line {
        ts: humantime::format_rfc3339_millis(r.start).to_string(),
        direction: r.direction,
        listener: &r.listener,
        method: r.method.as_str(),
        path: path(r),
        protocol: version_str(r.version),
        status: r.status,
        duration_ms: duration_ms(r),
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        peer: r.peer.to_string(),
        peer_identity: r.peer_identity.as_deref(),
        trace_id: r.trace_id.as_deref(),
        upstream: r.upstream.as_deref(),
        error: r.error,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

/// One line in the order people read a request, as nginx's and Envoy's default formats:
/// `ts direction listener peer "METHOD path PROTOCOL" status bytes_in bytes_out duration`,
/// then the fields that are set as `key=value`. The path is the only field a client
/// chooses freely: its quotes and backslashes are escaped so the line splits one way.
pub(super) fn text(out: &mut impl Write, r: &AccessRecord) -> std::io::Result<()> {
    write!(
        out,
        "{} {} {} {} \"{} ",
        humantime::format_rfc3339_millis(r.start),
        r.direction,
        r.listener,
        r.peer,
        r.method
    )?;
    for chunk in path(r).split_inclusive(['"', '\\']) {
        match chunk.strip_suffix(['"', '\\']) {
            Some(head) => write!(out, "{head}\\x{:02x}", chunk.as_bytes()[chunk.len() - 1])?,
            None => out.write_all(chunk.as_bytes())?,
        }
    }
    write!(
        out,
        " {}\" {} {} {} {:.3}ms",
        version_str(r.version),
        r.status,
        r.bytes_in,
        r.bytes_out,
        duration_ms(r)
    )?;
    let extra = [
        ("upstream", r.upstream.as_deref()),
        ("identity", r.peer_identity.as_deref()),
        ("trace_id", r.trace_id.as_deref()),
        ("error", r.error),
    ];
    for (k, v) in extra {
        if let Some(v) = v {
            write!(out, " {k}={v}")?;
        }
    }
    out.write_all(b"\n")
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::access_log::tests::record;

    #[test]
    fn json_is_one_line_with_the_public_fields() {
        let mut out = Vec::new();
        json(&mut out, &record()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ts"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["duration_ms"], 1.5);
        assert!(v["peer_identity"].is_null());
        assert!(out.ends_with(b"\n"));
    }

    #[test]
    fn text_is_one_human_line() {
        let mut out = Vec::new();
        text(&mut out, &record()).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "2023-11-14T22:13:20.000Z inbound web 127.0.0.1:5555 \"POST /a?b=1 HTTP/1.1\" 201 3 4 1.500ms \
             trace_id=4bf92f3577b34da6a3ce929d0e0e4736\n"
        );
    }

    #[test]
    fn text_escapes_quotes_in_the_path() {
        let mut r = record();
        r.uri = http::Uri::from_static("/a\"b\\c");
        r.error = Some("app_timeout");
        let mut out = Vec::new();
        text(&mut out, &r).unwrap();
        let line = std::str::from_utf8(&out).unwrap();
        assert!(line.contains("\"POST /a\\x22b\\x5cc HTTP/1.1\""), "{line}");
        assert!(line.ends_with(" error=app_timeout\n"), "{line}");
    }
}
