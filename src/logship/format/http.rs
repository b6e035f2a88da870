//! The `http` sink: NDJSON, one `doc` object a line, to any endpoint (Vector's `http` source,
//! Fluent Bit's, Logstash's `http` input, a function behind a gateway).

use super::Format;
use crate::logship::doc;
use crate::logship::record::Record;
use crate::telemetry::access_log::format::Stamps;

pub struct Ndjson;

impl Format for Ndjson {
    fn encode(&self, records: &[Record<'_>], out: &mut Vec<u8>) {
        let mut stamps = Stamps::default();
        out.reserve(records.iter().map(|r| r.line.len() + 128).sum());
        for r in records {
            doc::write(out, &mut stamps, r);
            out.push(b'\n');
        }
    }

    fn content_type(&self) -> &'static str {
        "application/x-ndjson"
    }
}
