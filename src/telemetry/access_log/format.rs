//! An access-log record as a line: JSON (the contract's fields) or text (a human's line).

use std::io::Write;

use http::Version;

use super::AccessRecord;

fn path(r: &AccessRecord) -> &str {
    &r.path
}

fn duration_ms(r: &AccessRecord) -> f64 {
    (r.duration.as_micros() as f64) / 1000.0
}

/// One JSON object and a newline, fields as INTERFACE.md lists them (absent ones as
/// `null`). Written by hand into the batch: serde's generic path took 7k instructions a
/// record, the most expensive part of a request with the access log on.
pub(super) fn json(out: &mut Vec<u8>, stamps: &mut Stamps, r: &AccessRecord) -> std::io::Result<()> {
    out.extend_from_slice(b"{\"ts\":\"");
    stamps.write(out, r.start);
    out.extend_from_slice(b"\",\"direction\":");
    string(out, r.direction);
    out.extend_from_slice(b",\"listener\":");
    string(out, &r.listener);
    out.extend_from_slice(b",\"method\":");
    string(out, r.method.as_str());
    out.extend_from_slice(b",\"path\":");
    string(out, path(r));
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(version_str(r.version).as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    int(out, r.status as u64);
    out.extend_from_slice(b",\"duration_ms\":");
    let micros = r.duration.as_micros() as u64;
    int(out, micros / 1000);
    let frac = micros % 1000;
    if frac != 0 {
        // Up to three decimals, trailing zeros dropped, as a float prints (1.5, not 1.500).
        let digits = format!("{frac:03}");
        out.push(b'.');
        out.extend_from_slice(digits.trim_end_matches('0').as_bytes());
    }
    out.extend_from_slice(b",\"bytes_in\":");
    int(out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    int(out, r.bytes_out);
    out.extend_from_slice(b",\"peer\":\"");
    peer(out, r.peer)?;
    out.push(b'"');
    out.extend_from_slice(b",\"trace_id\":");
    match r.trace_id {
        // Hex digits: nothing to escape.
        Some(id) => {
            out.push(b'"');
            out.extend_from_slice(crate::telemetry::context::TraceHex::new(id).as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    let optional = [
        (&b",\"peer_identity\":"[..], r.peer_identity.as_deref()),
        (b",\"upstream\":", r.upstream.as_deref()),
        (b",\"error\":", r.error),
    ];
    for (key, value) in optional {
        out.extend_from_slice(key);
        match value {
            Some(v) => string(out, v),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// `ip:port`. IPv4 digit by digit: std's `Display` for it formats through a buffer for
/// padding and was a third of the record's cost.
fn peer(out: &mut Vec<u8>, addr: std::net::SocketAddr) -> std::io::Result<()> {
    match addr {
        std::net::SocketAddr::V4(a) => {
            ip(out, std::net::IpAddr::V4(*a.ip()))?;
            out.push(b':');
            int(out, u64::from(a.port()));
            Ok(())
        }
        v6 => write!(out, "{v6}"),
    }
}

/// An address as `Display` writes it, IPv4 without its formatting machinery.
pub(crate) fn ip(out: &mut Vec<u8>, addr: std::net::IpAddr) -> std::io::Result<()> {
    match addr {
        std::net::IpAddr::V4(a) => {
            for (i, octet) in a.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                int(out, u64::from(*octet));
            }
            Ok(())
        }
        v6 => write!(out, "{v6}"),
    }
}

fn int(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Timestamps in RFC 3339, UTC, with milliseconds, as humantime writes them; the date and
/// time of day are formatted once a second, not once a record.
#[derive(Default)]
pub(crate) struct Stamps {
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    prefix: Vec<u8>,
}

impl Stamps {
    pub(crate) fn write(&mut self, out: &mut Vec<u8>, t: std::time::SystemTime) {
        let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        if self.second != Some(since.as_secs()) {
            let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(since.as_secs());
            self.prefix.clear();
            let _ = write!(self.prefix, "{}", humantime::format_rfc3339_seconds(whole));
            self.prefix.pop(); // the `Z`
            self.second = Some(since.as_secs());
        }
        out.extend_from_slice(&self.prefix);
        let ms = since.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// A JSON string: quotes, backslashes and control characters escaped (RFC 8259 §7).
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    loop {
        let i = next_special(bytes, start);
        out.extend_from_slice(&bytes[start..i]);
        let Some(&b) = bytes.get(i) else { break };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push(b'"');
}

/// The index of the first byte at or after `from` that JSON must escape (`"`, `\`, below
/// 0x20), or `bytes.len()`. Eight bytes a step (SWAR): a log line shipped as text has a quote
/// every few bytes, and a byte-at-a-time scan between them was most of its cost.
fn next_special(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut i = from;
    while let Some(word) = bytes.get(i..i + 8) {
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        // The lowest flagged byte is exact in each test (a borrow only flags bytes above it).
        let found = (w.wrapping_sub(ONES * 0x20) & !w & HIGH)
            | zero_byte(w ^ (ONES * u64::from(b'"')))
            | zero_byte(w ^ (ONES * u64::from(b'\\')));
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    // Fewer than 8 left (the loop stops with i <= len).
    bytes[i..].iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\').map_or(bytes.len(), |p| i + p)
}

/// One line in the order people read a request, as nginx's and Envoy's default formats:
/// `ts direction listener peer "METHOD path PROTOCOL" status bytes_in bytes_out duration`,
/// then the fields that are set as `key=value`. The path is the only field a client
/// chooses freely: its quotes and backslashes are escaped so the line splits one way.
pub(super) fn text(out: &mut Vec<u8>, stamps: &mut Stamps, r: &AccessRecord) -> std::io::Result<()> {
    stamps.write(out, r.start);
    write!(out, " {} {} {} \"{} ", r.direction, r.listener, r.peer, r.method)?;
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
    let trace_id = r.trace_id.map(crate::telemetry::context::TraceHex::new);
    let extra = [
        ("upstream", r.upstream.as_deref()),
        ("identity", r.peer_identity.as_deref()),
        ("trace_id", trace_id.as_ref().map(|t| t.as_str())),
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
        json(&mut out, &mut Stamps::default(), &record()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ts"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["duration_ms"], 1.5);
        assert!(v["peer_identity"].is_null());
        assert!(out.ends_with(b"\n"));
    }

    #[test]
    fn json_escapes_what_json_must_and_writes_absent_fields_as_null() {
        let mut r = record();
        r.path = "/a\"b\\c".into();
        r.listener = "we\u{1}b".into();
        r.duration = std::time::Duration::from_micros(2_000);
        r.trace_id = None;
        let mut out = Vec::new();
        json(&mut out, &mut Stamps::default(), &r).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/a\"b\\c");
        assert_eq!(v["listener"], "we\u{1}b");
        assert_eq!(v["duration_ms"], 2);
        assert!(v["trace_id"].is_null() && v["error"].is_null() && v["upstream"].is_null());
        assert_eq!(v.as_object().unwrap().len(), 15, "every field of the contract");
        assert_eq!(v["peer"], "127.0.0.1:5555");
        r.peer = "[::1]:80".parse().unwrap();
        let mut out = Vec::new();
        json(&mut out, &mut Stamps::default(), &r).unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap()["peer"], "[::1]:80");
    }

    #[test]
    fn cached_timestamps_match_humantime() {
        let mut stamps = Stamps::default();
        let base = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_764_748_799);
        for ms in [0u64, 7, 42, 999, 1000, 1001, 86_400_005] {
            let t = base + std::time::Duration::from_millis(ms) + std::time::Duration::from_micros(321);
            let mut out = Vec::new();
            stamps.write(&mut out, t);
            assert_eq!(String::from_utf8(out).unwrap(), humantime::format_rfc3339_millis(t).to_string());
        }
    }

    #[test]
    fn text_is_one_human_line() {
        let mut out = Vec::new();
        text(&mut out, &mut Stamps::default(), &record()).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "2023-11-14T22:13:20.000Z inbound web 127.0.0.1:5555 \"POST /a?b=1 HTTP/1.1\" 201 3 4 1.500ms \
             trace_id=4bf92f3577b34da6a3ce929d0e0e4736\n"
        );
    }

    #[test]
    fn text_escapes_quotes_in_the_path() {
        let mut r = record();
        r.path = "/a\"b\\c".into();
        r.error = Some("app_timeout");
        let mut out = Vec::new();
        text(&mut out, &mut Stamps::default(), &r).unwrap();
        let line = std::str::from_utf8(&out).unwrap();
        assert!(line.contains("\"POST /a\\x22b\\x5cc HTTP/1.1\""), "{line}");
        assert!(line.ends_with(" error=app_timeout\n"), "{line}");
    }

    #[test]
    fn escapes_are_found_eight_bytes_at_a_time_exactly_as_one_by_one() {
        let naive = |b: &[u8], from: usize| {
            (from..b.len()).find(|&i| b[i] < 0x20 || b[i] == b'"' || b[i] == b'\\').unwrap_or(b.len())
        };
        let alphabet: &[u8] = b"a\"\\\n\x01\x1f\x20\x7f\xc3\xa9!~\x00";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..40 {
            for _ in 0..50 {
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        alphabet[(seed % alphabet.len() as u64) as usize]
                    })
                    .collect();
                for from in 0..=len {
                    assert_eq!(super::next_special(&s, from), naive(&s, from), "{s:?} from {from}");
                }
            }
        }
        let mut out = Vec::new();
        super::string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(String::from_utf8(out).unwrap(), r#""a\"b\\c\nd\u0001é""#);
    }
}
