//! A record as one JSON document: what the `http` sink sends a line of and Elasticsearch
//! indexes. A JSON object line keeps its own members and gains the sidecar's; a text line
//! becomes `message`.
//!
//! `{"timestamp":"…","source":"app","file":"/var/log/app/a.log",<fields>,"message":"…"}`
//!
//! A member the app's own object already has (its `timestamp`, say) is not written again:
//! duplicate keys are invalid for Elasticsearch and ambiguous for everyone else.

use std::time::{Duration, UNIX_EPOCH};

use super::record::Record;
use crate::telemetry::access_log::format::{Stamps, string};

/// The sidecar's own members, in the order they are written; `Entry::clashes` has a bit for
/// each, then one for each of the source's fields.
pub const OWN_KEYS: [&str; 3] = ["timestamp", "source", "file"];

/// Writes `record` as one JSON object, without a newline.
pub(crate) fn write(out: &mut Vec<u8>, stamps: &mut Stamps, record: &Record<'_>) {
    let e = record.entry;
    let clashes = e.clashes;
    out.push(b'{');
    let mut bit = 0u32;
    let mut first = true;
    let mut key = |out: &mut Vec<u8>, name: &str, first: &mut bool| -> bool {
        let skip = bit < 64 && clashes & (1 << bit) != 0;
        bit += 1;
        if skip {
            return false;
        }
        if !*first {
            out.push(b',');
        }
        *first = false;
        string(out, name);
        out.push(b':');
        true
    };
    if key(out, OWN_KEYS[0], &mut first) {
        out.push(b'"');
        stamps.write(out, UNIX_EPOCH + Duration::from_nanos(e.time_ns));
        out.push(b'"');
    }
    if key(out, OWN_KEYS[1], &mut first) {
        string(out, &e.source.name);
    }
    if key(out, OWN_KEYS[2], &mut first) {
        string(out, &e.file.path);
    }
    for (k, v) in &e.source.fields {
        if key(out, k, &mut first) {
            string(out, v);
        }
    }
    if e.truncated {
        // Not in `clashes`: a cut line is never a whole JSON object.
        out.extend_from_slice(b",\"truncated\":true");
    }
    if e.json_object {
        // The object's members after ours: `{` is dropped, the rest kept byte for byte.
        let inner = &record.line[1..];
        let empty = inner.iter().take_while(|b| b.is_ascii_whitespace()).count() + 1 == inner.len();
        if !empty && !first {
            out.push(b',');
        }
        let inner = inner.trim_ascii_start();
        // A pretty-printed object joined from several lines: its newlines are whitespace
        // between tokens (never inside a JSON string), and NDJSON allows none.
        if memchr::memchr2(b'\n', b'\r', inner).is_some() {
            out.extend(inner.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }));
        } else {
            out.extend_from_slice(inner);
        }
        return;
    }
    out.extend_from_slice(b",\"message\":");
    string(out, &record.text());
    out.push(b'}');
}
