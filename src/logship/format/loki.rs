//! Grafana Loki's push API (`POST /loki/api/v1/push`, the `sink` adds the path): records
//! grouped into streams by their labels, as snappy-compressed protobuf (what Promtail and
//! Alloy send) or as JSON.
//!
//! Not responsible for batching, sending or retries (`sink`); a 2xx (Loki answers 204) means
//! every record is in, so the trait's default verdict stands.

use std::sync::Arc;

use prost::Message;

use super::Format;
use crate::logship::record::{Record, SourceInfo};
use crate::telemetry::access_log::format::string;

/// Source fields that become labels, and the names Loki users know them by. Only the pod's
/// identity: every distinct label set is a stream Loki indexes, so a label's values must come
/// from a small set; the other fields would make a stream per value.
const POD_LABELS: [(&str, &str); 4] = [
    ("k8s.namespace.name", "namespace"),
    ("k8s.pod.name", "pod"),
    ("k8s.container.name", "container"),
    ("k8s.node.name", "node"),
];

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The Loki sink's wire format.
pub struct Loki {
    /// Static labels from the config, on every stream.
    labels: Vec<(String, String)>,
    /// JSON instead of protobuf, for a proxy in front of Loki that only passes JSON.
    json: bool,
}

// logproto's push messages (`pkg/push/push.proto` in grafana/loki), by their field numbers.

#[derive(Clone, PartialEq, prost::Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    streams: Vec<StreamAdapter>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StreamAdapter {
    /// The label set as Loki parses it: `{a="b", c="d"}`.
    #[prost(string, tag = "1")]
    labels: String,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<EntryAdapter>,
    /// Loki computes it from the labels itself; senders leave it 0.
    #[prost(uint64, tag = "3")]
    hash: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EntryAdapter {
    #[prost(message, optional, tag = "1")]
    timestamp: Option<Timestamp>,
    #[prost(string, tag = "2")]
    line: String,
    #[prost(message, repeated, tag = "3")]
    structured_metadata: Vec<LabelPairAdapter>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LabelPairAdapter {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, PartialEq, prost::Message)]
struct Timestamp {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// Records that share one label set.
struct Stream<'a> {
    /// `(name, value)`, sorted by name.
    pairs: Vec<(&'a str, &'a str)>,
    /// `pairs` as Loki writes a label set.
    labels: String,
    /// Indices into the request's records, in reading order.
    records: Vec<usize>,
}

impl Loki {
    pub fn new(labels: Vec<(String, String)>, json: bool) -> Loki {
        Loki { labels, json }
    }

    /// The label pairs of records from `source`, sorted by name. A name given twice keeps
    /// its later value (the source's own over the config's): Loki refuses a stream whose
    /// labels repeat a name.
    fn pairs<'a>(&'a self, source: &'a SourceInfo) -> Vec<(&'a str, &'a str)> {
        let mut pairs: Vec<(&str, &str)> =
            self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        pairs.push(("source", &source.name));
        for (key, value) in &source.fields {
            if let Some((_, name)) = POD_LABELS.iter().find(|(field, _)| field == key) {
                pairs.push((*name, value.as_str()));
            }
        }
        // Reversed, then a stable sort: of equal names the last given comes first and stays.
        pairs.reverse();
        pairs.sort_by_key(|&(name, _)| name);
        pairs.dedup_by_key(|&mut (name, _)| name);
        pairs
    }

    /// `records` grouped by label set, streams in the order their first record was read.
    fn streams<'a>(&'a self, records: &[Record<'a>]) -> Vec<Stream<'a>> {
        let mut streams: Vec<Stream> = Vec::new();
        // The labels depend only on the source, so they are worked out once per source.
        let mut known: Vec<(*const SourceInfo, usize)> = Vec::new();
        for (i, record) in records.iter().enumerate() {
            let source = &record.entry.source;
            let at = match known.iter().find(|(ptr, _)| *ptr == Arc::as_ptr(source)) {
                Some(&(_, at)) => at,
                None => {
                    let pairs = self.pairs(source);
                    let labels = label_set(&pairs);
                    // Sources that differ only in fields that are not labels share a
                    // stream, as Loki would merge them anyway.
                    let at = match streams.iter().position(|s| s.labels == labels) {
                        Some(at) => at,
                        None => {
                            streams.push(Stream { pairs, labels, records: Vec::new() });
                            streams.len() - 1
                        }
                    };
                    known.push((Arc::as_ptr(source), at));
                    at
                }
            };
            streams[at].records.push(i);
        }
        streams
    }

    fn encode_protobuf(&self, records: &[Record<'_>], out: &mut Vec<u8>) {
        let streams = self
            .streams(records)
            .into_iter()
            .map(|s| StreamAdapter {
                labels: s.labels,
                entries: s.records.iter().map(|&i| entry(&records[i])).collect(),
                hash: 0,
            })
            .collect();
        let raw = PushRequest { streams }.encode_to_vec();
        // Snappy's block format, not its framed one: that is what Loki's push handler
        // decompresses.
        let start = out.len();
        out.resize(start + snap::raw::max_compress_len(raw.len()), 0);
        let written = snap::raw::Encoder::new()
            .compress(&raw, &mut out[start..])
            .expect("snappy refuses only inputs over 4 GiB, and a batch is far smaller");
        out.truncate(start + written);
    }

    /// `{"streams":[{"stream":{labels},"values":[["<unix ns>","<line>"], ...]}]}`. Without
    /// structured metadata: older Lokis refuse a value with a third element.
    fn encode_json(&self, records: &[Record<'_>], out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"streams\":[");
        for (n, stream) in self.streams(records).iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"stream\":{");
            for (i, (name, value)) in stream.pairs.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(out, name);
                out.push(b':');
                string(out, value);
            }
            out.extend_from_slice(b"},\"values\":[");
            for (i, &r) in stream.records.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // A string: nanoseconds since 1970 do not fit the doubles JSON readers use.
                out.extend_from_slice(b"[\"");
                out.extend_from_slice(itoa::Buffer::new().format(records[r].entry.time_ns).as_bytes());
                out.extend_from_slice(b"\",");
                string(out, &records[r].text());
                out.push(b']');
            }
            out.extend_from_slice(b"]}");
        }
        out.extend_from_slice(b"]}");
    }
}

impl Format for Loki {
    fn encode(&self, records: &[Record<'_>], out: &mut Vec<u8>) {
        if self.json { self.encode_json(records, out) } else { self.encode_protobuf(records, out) }
    }

    fn content_type(&self) -> &'static str {
        if self.json { "application/json" } else { "application/x-protobuf" }
    }
}

/// A label set as Loki parses it (PromQL's syntax): `{a="b", c="d"}`. A value is a Go-style
/// string, in which a raw newline, a quote or a backslash would end or break it.
fn label_set(pairs: &[(&str, &str)]) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

fn entry(record: &Record<'_>) -> EntryAdapter {
    let e = record.entry;
    // Structured metadata, not labels: a value per file (or per line) would make a stream
    // each. `filename` is the name Promtail gives the path, so existing queries keep working.
    let mut structured_metadata =
        vec![LabelPairAdapter { name: "filename".into(), value: e.file.path.clone() }];
    if e.truncated {
        structured_metadata.push(LabelPairAdapter { name: "truncated".into(), value: "true".into() });
    }
    EntryAdapter {
        timestamp: Some(Timestamp {
            // Both fit: u64 nanoseconds are at most 1.8e10 seconds, and the rest is below 1e9.
            seconds: (e.time_ns / NANOS_PER_SECOND) as i64,
            nanos: (e.time_ns % NANOS_PER_SECOND) as i32,
        }),
        line: record.text().into_owned(),
        structured_metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logship::record::testing::{T0, chunk, records};
    use crate::logship::record::{Chunk, FileInfo};

    fn source(name: &str, fields: &[(&str, &str)]) -> Arc<SourceInfo> {
        let fields = fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Arc::new(SourceInfo { name: name.into(), fields, json: false })
    }

    fn file(path: &str) -> Arc<FileInfo> {
        Arc::new(FileInfo { id: 1, path: path.into(), key: "c0ffee-801-2a".into() })
    }

    fn push(loki: &Loki, chunk: &Chunk) -> PushRequest {
        let mut body = b"kept".to_vec();
        loki.encode(&records(chunk), &mut body);
        assert_eq!(&body[..4], b"kept", "encode appends");
        let raw = snap::raw::Decoder::new().decompress_vec(&body[4..]).expect("snappy block format");
        PushRequest::decode(raw.as_slice()).expect("a PushRequest")
    }

    fn pod() -> Arc<SourceInfo> {
        source(
            "app",
            &[
                ("team", "checkout"),
                ("k8s.pod.name", "web-7f9c"),
                ("k8s.namespace.name", "shop"),
                ("k8s.container.name", "web"),
                ("k8s.node.name", "node-3"),
                ("k8s.pod.uid", "1f0e-77"),
            ],
        )
    }

    #[test]
    fn protobuf_stream_has_pod_labels_and_lines_in_order() {
        let loki = Loki::new(vec![("cluster".into(), "eu-1".into())], false);
        let (app, log) = (pod(), file("/var/log/app/app.log"));
        let mut chunk = chunk(&[(&app, &log, "started"), (&app, &log, "GET / 200"), (&app, &log, "héllo")]);
        chunk.entries[1].truncated = true;

        let request = push(&loki, &chunk);
        assert_eq!(request.streams.len(), 1);
        let stream = &request.streams[0];
        // Sorted by name; `team` and `k8s.pod.uid` are per-pod or free-form, never labels.
        assert_eq!(
            stream.labels,
            r#"{cluster="eu-1", container="web", namespace="shop", node="node-3", pod="web-7f9c", source="app"}"#
        );
        assert_eq!(stream.hash, 0);
        let lines: Vec<&str> = stream.entries.iter().map(|e| e.line.as_str()).collect();
        assert_eq!(lines, ["started", "GET / 200", "héllo"]);
        let first = stream.entries[0].timestamp.as_ref().unwrap();
        assert_eq!((first.seconds, first.nanos), (1_700_000_000, 123_456_789));
        let third = stream.entries[2].timestamp.as_ref().unwrap();
        assert_eq!((third.seconds, third.nanos), (1_700_000_000, 123_458_789));

        let metadata = |i: usize| -> Vec<(&str, &str)> {
            let m = &stream.entries[i].structured_metadata;
            m.iter().map(|p| (p.name.as_str(), p.value.as_str())).collect()
        };
        assert_eq!(metadata(0), [("filename", "/var/log/app/app.log")]);
        assert_eq!(metadata(1), [("filename", "/var/log/app/app.log"), ("truncated", "true")]);
        assert_eq!(loki.content_type(), "application/x-protobuf");
        assert_eq!(loki.content_encoding(), None, "snappy is part of Loki's protobuf, not a header");
    }

    #[test]
    fn two_sources_make_two_streams_each_in_reading_order() {
        let loki = Loki::new(Vec::new(), false);
        let (app, nginx) = (source("app", &[]), source("nginx", &[]));
        let (a, n) = (file("/logs/app.log"), file("/logs/access.log"));
        let chunk = chunk(&[(&app, &a, "a1"), (&nginx, &n, "n1"), (&app, &a, "a2"), (&nginx, &n, "n2")]);

        let request = push(&loki, &chunk);
        let streams: Vec<(&str, Vec<&str>)> = request
            .streams
            .iter()
            .map(|s| (s.labels.as_str(), s.entries.iter().map(|e| e.line.as_str()).collect()))
            .collect();
        assert_eq!(
            streams,
            [(r#"{source="app"}"#, vec!["a1", "a2"]), (r#"{source="nginx"}"#, vec!["n1", "n2"])]
        );
        let filenames: Vec<&str> =
            request.streams[1].entries.iter().map(|e| e.structured_metadata[0].value.as_str()).collect();
        assert_eq!(filenames, ["/logs/access.log", "/logs/access.log"]);
    }

    #[test]
    fn sources_with_one_label_set_share_a_stream() {
        let loki = Loki::new(Vec::new(), false);
        let (first, second) = (source("app", &[("team", "a")]), source("app", &[("team", "b")]));
        let log = file("/logs/app.log");
        let chunk = chunk(&[(&first, &log, "1"), (&second, &log, "2"), (&first, &log, "3")]);

        let request = push(&loki, &chunk);
        assert_eq!(request.streams.len(), 1);
        let lines: Vec<&str> = request.streams[0].entries.iter().map(|e| e.line.as_str()).collect();
        assert_eq!(lines, ["1", "2", "3"]);
    }

    #[test]
    fn label_values_are_escaped() {
        let loki = Loki::new(vec![("env".into(), "a\"b\\c\nd".into())], false);
        let app = source("app", &[("k8s.pod.name", "tab\there")]);
        let chunk = chunk(&[(&app, &file("/l"), "x")]);

        let request = push(&loki, &chunk);
        let expected = format!(r#"{{env="a\"b\\c\nd", pod="tab{}here", source="app"}}"#, '\t');
        assert_eq!(request.streams[0].labels, expected, "a tab is allowed as it is");
    }

    #[test]
    fn a_label_given_twice_keeps_the_sources_value() {
        let loki =
            Loki::new(vec![("source".into(), "configured".into()), ("pod".into(), "static".into())], false);
        let app = source("app", &[("k8s.pod.name", "web-1")]);
        let chunk = chunk(&[(&app, &file("/l"), "x")]);

        let request = push(&loki, &chunk);
        assert_eq!(request.streams[0].labels, r#"{pod="web-1", source="app"}"#);
    }

    #[test]
    fn json_has_streams_and_string_timestamps_without_metadata() {
        let loki = Loki::new(vec![("cluster".into(), "eu-1".into())], true);
        let (app, nginx) = (pod(), source("nginx", &[]));
        let log = file("/var/log/app/app.log");
        let mut chunk =
            chunk(&[(&app, &log, "say \"hi\"\n  at main"), (&nginx, &log, "GET /"), (&app, &log, "bad ?")]);
        let bad = chunk.entries[2].range.end - 1;
        chunk.text[bad] = 0xff;
        chunk.entries[0].truncated = true;

        let mut body = Vec::new();
        loki.encode(&records(&chunk), &mut body);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        let expected = serde_json::json!({"streams": [
            {
                "stream": {
                    "cluster": "eu-1", "container": "web", "namespace": "shop", "node": "node-3",
                    "pod": "web-7f9c", "source": "app"
                },
                "values": [
                    [T0.to_string(), "say \"hi\"\n  at main"],
                    [(T0 + 2_000).to_string(), "bad \u{fffd}"]
                ]
            },
            {"stream": {"cluster": "eu-1", "source": "nginx"}, "values": [[(T0 + 1_000).to_string(), "GET /"]]}
        ]});
        assert_eq!(v, expected);
        assert_eq!(loki.content_type(), "application/json");
        assert_eq!(loki.content_encoding(), None);
    }

    #[test]
    fn json_labels_are_in_name_order() {
        let loki = Loki::new(vec![("zone".into(), "b".into()), ("app".into(), "web".into())], true);
        let chunk = chunk(&[(&source("s", &[]), &file("/l"), "x")]);
        let mut body = Vec::new();
        loki.encode(&records(&chunk), &mut body);
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.starts_with(r#"{"streams":[{"stream":{"app":"web","source":"s","zone":"b"},"values":"#),
            "{text}"
        );
    }

    #[test]
    fn a_2xx_is_delivered() {
        let loki = Loki::new(Vec::new(), false);
        assert_eq!(loki.verdict(b"", 10), super::super::Verdict::Delivered);
    }
}
