//! OTLP trace export requests in protobuf, written straight from the sidecar's span records.
//!
//! Hand-written because measurement put the library path in the way (ARCHITECTURE.md): the
//! SDK's `SpanData` through opentelemetry-otlp cost 25k instructions a span, and building
//! opentelemetry-proto's prost structs still 19k (an owned `String` per attribute, then
//! freeing them), as much as proxying the request itself. Writing the wire format
//! (protobuf's varints, fixed64s and length-delimited fields) into one buffer per batch
//! takes a few thousand. The message is opentelemetry-proto's `ExportTraceServiceRequest`,
//! which the unit tests decode with that crate's types.

/// One attribute's value.
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
}

const LEN: u8 = 2;
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const FIXED32: u8 = 5;

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// `KeyValue { key = 1, value = 2: AnyValue { string_value = 1 | int_value = 3 } }`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Attr) {
    let value_len = match value {
        Attr::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
        Attr::Int(i) => 1 + varint_len(*i as u64),
    };
    let body_len =
        1 + varint_len(key.len() as u64) + key.len() + 1 + varint_len(value_len as u64) + value_len;
    // The common case, a short string: every length is one byte, so the whole field is
    // four pieces (this runs 18 times a span).
    if let (Attr::Str(s), true) = (value, body_len < 128 && field < 16) {
        out.extend_from_slice(&[(field << 3) as u8 | LEN, body_len as u8, 0x0a, key.len() as u8]);
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&[0x12, value_len as u8, 0x0a, s.len() as u8]);
        out.extend_from_slice(s.as_bytes());
        return;
    }
    tag(out, field, LEN);
    varint(out, body_len as u64);
    bytes_field(out, 1, key.as_bytes());
    tag(out, 2, LEN);
    varint(out, value_len as u64);
    match value {
        Attr::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Attr::Int(i) => {
            tag(out, 3, VARINT);
            varint(out, *i as u64);
        }
    }
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// `Resource { attributes = 1 }`, written once and reused for every batch.
pub fn resource(attrs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in attrs {
        key_value(&mut out, 1, k, &Attr::Str(v));
    }
    out
}

/// One span's fields, borrowed from its record.
pub struct SpanFields<'a> {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent: Option<u64>,
    pub name: &'a str,
    /// OTLP `SpanKind`: 2 server, 3 client.
    pub kind: u64,
    pub start_nanos: u64,
    pub end_nanos: u64,
    pub attrs: &'a [(&'a str, Attr<'a>)],
    /// An error's description: status code ERROR with this message.
    pub error: Option<&'a str>,
}

/// A batch of spans under one resource and the `sidecar` scope.
#[derive(Default)]
pub struct Batch {
    /// The `ScopeSpans.spans` fields written so far.
    spans: Vec<u8>,
    count: usize,
    scratch: Vec<u8>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// `Span`: ids 1, 2, parent 4, name 5, kind 6, start 7, end 8, attributes 9, status 15,
    /// flags 16.
    pub fn push(&mut self, s: &SpanFields) {
        let mut body = std::mem::take(&mut self.scratch);
        body.clear();
        bytes_field(&mut body, 1, &s.trace_id.to_be_bytes());
        bytes_field(&mut body, 2, &s.span_id.to_be_bytes());
        if let Some(p) = s.parent {
            bytes_field(&mut body, 4, &p.to_be_bytes());
        }
        bytes_field(&mut body, 5, s.name.as_bytes());
        tag(&mut body, 6, VARINT);
        varint(&mut body, s.kind);
        tag(&mut body, 7, FIXED64);
        body.extend_from_slice(&s.start_nanos.to_le_bytes());
        tag(&mut body, 8, FIXED64);
        body.extend_from_slice(&s.end_nanos.to_le_bytes());
        for (k, v) in s.attrs {
            key_value(&mut body, 9, k, v);
        }
        if let Some(message) = s.error {
            // Status { message = 2, code = 3 (2: ERROR) }
            let len = 1 + varint_len(message.len() as u64) + message.len() + 2;
            tag(&mut body, 15, LEN);
            varint(&mut body, len as u64);
            bytes_field(&mut body, 2, message.as_bytes());
            tag(&mut body, 3, VARINT);
            varint(&mut body, 2);
        }
        // Sampled; bit 8: whether the parent is remote is known, bit 9: it is.
        let flags: u32 = 0x01 | 0x100 | if s.parent.is_some() { 0x200 } else { 0 };
        tag(&mut body, 16, FIXED32);
        body.extend_from_slice(&flags.to_le_bytes());
        bytes_field(&mut self.spans, 2, &body);
        self.scratch = body;
        self.count += 1;
    }

    /// The `ExportTraceServiceRequest` body, and the batch emptied for the next one. The
    /// envelopes' lengths are known from the parts, so the spans are copied once.
    pub fn finish(&mut self, resource: &[u8], version: &str) -> Vec<u8> {
        let field_len = |len: usize| 1 + varint_len(len as u64) + len;
        // InstrumentationScope { name = 1, version = 2 }
        let scope_len = field_len(b"sidecar".len()) + field_len(version.len());
        // ScopeSpans { scope = 1, spans = 2 (already fields) }
        let scope_spans_len = field_len(scope_len) + self.spans.len();
        // ResourceSpans { resource = 1, scope_spans = 2 }
        let resource_spans_len = field_len(resource.len()) + field_len(scope_spans_len);
        // ExportTraceServiceRequest { resource_spans = 1 }
        let total = field_len(resource_spans_len);
        let mut out = Vec::with_capacity(total);
        tag(&mut out, 1, LEN);
        varint(&mut out, resource_spans_len as u64);
        bytes_field(&mut out, 1, resource);
        tag(&mut out, 2, LEN);
        varint(&mut out, scope_spans_len as u64);
        tag(&mut out, 1, LEN);
        varint(&mut out, scope_len as u64);
        bytes_field(&mut out, 1, b"sidecar");
        bytes_field(&mut out, 2, version.as_bytes());
        out.extend_from_slice(&self.spans);
        debug_assert_eq!(out.len(), total);
        self.spans.clear();
        self.count = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn a_batch_decodes_with_opentelemetry_proto() {
        let mut batch = Batch::default();
        let long = "x".repeat(300);
        let attrs = [
            ("http.request.method", Attr::Str("GET")),
            ("http.response.status_code", Attr::Int(503)),
            ("client.port", Attr::Int(-1)),
            ("url.path", Attr::Str(&long)),
        ];
        let span = SpanFields {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            parent: Some(7),
            name: "GET",
            kind: 2,
            start_nanos: 1_700_000_000_000_000_000,
            end_nanos: 1_700_000_000_001_500_000,
            attrs: &attrs,
            error: Some("503"),
        };
        batch.push(&span);
        batch.push(&SpanFields { parent: None, error: None, ..span });
        assert_eq!(batch.len(), 2);
        let resource = resource(&[("service.name".into(), "checkout".into())]);
        let body = batch.finish(&resource, "0.1.0");
        assert!(batch.is_empty());

        let req = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        let rs = &req.resource_spans[0];
        let r = rs.resource.as_ref().unwrap();
        assert_eq!(r.attributes[0].key, "service.name");
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "sidecar");
        assert_eq!(ss.scope.as_ref().unwrap().version, "0.1.0");
        let (a, b) = (&ss.spans[0], &ss.spans[1]);
        assert_eq!(a.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes());
        assert_eq!(a.span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
        assert_eq!(a.parent_span_id, 7u64.to_be_bytes());
        assert!(b.parent_span_id.is_empty());
        assert_eq!((a.name.as_str(), a.kind), ("GET", 2));
        assert_eq!(a.end_time_unix_nano - a.start_time_unix_nano, 1_500_000);
        assert_eq!(a.flags, 0x301);
        assert_eq!(b.flags, 0x101);
        let value = |i: usize| a.attributes[i].value.as_ref().unwrap().value.clone().unwrap();
        assert_eq!(value(0), Value::StringValue("GET".into()));
        assert_eq!(value(1), Value::IntValue(503));
        assert_eq!(value(2), Value::IntValue(-1));
        assert_eq!(value(3), Value::StringValue(long.clone()));
        let status = a.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "503"));
        assert!(b.status.is_none());
    }
}
