//! OTLP/HTTP logs (`POST /v1/logs`, the `sink` adds the path) in protobuf: a `LogRecord` per
//! record under one `ResourceLogs` per pod; and the collector's partial-success answer.
//!
//! Built from opentelemetry-proto's prost types, not written by hand as the traces in
//! `telemetry::otlp` are: log shipping runs beside the app, off the proxy's request path, so
//! its cost per record does not add to a request's.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::{Format, Verdict};
use crate::logship::record::{Record, Severity, SourceInfo};

/// The instrumentation scope every record is under.
const SCOPE: &str = "sidecar.logship";

/// The OTLP sink's wire format.
pub struct Otlp {
    /// Resource attributes from the config (`service.name` and the like), on every request.
    resource: Vec<(String, String)>,
}

/// Records from one pod.
struct Pod<'a> {
    /// The source's `k8s.*` fields, in the source's order.
    identity: Vec<(&'a str, &'a str)>,
    log_records: Vec<LogRecord>,
}

impl Otlp {
    pub fn new(resource: Vec<(String, String)>) -> Otlp {
        Otlp { resource }
    }

    /// The configured attributes, then the pod's. A key in both keeps the pod's value, which
    /// the downward API gave for the pod the records came from: OTLP forbids a key twice.
    fn resource(&self, identity: &[(&str, &str)]) -> Resource {
        let configured = self
            .resource
            .iter()
            .filter(|(key, _)| !identity.iter().any(|(k, _)| k == key))
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let attributes = configured.chain(identity.iter().copied()).map(|(k, v)| text(k, v)).collect();
        Resource { attributes, ..Default::default() }
    }
}

impl Format for Otlp {
    fn encode(&self, records: &[Record<'_>], out: &mut Vec<u8>) {
        // Resource attributes describe where records come from, so records from different
        // pods cannot share one. A sidecar tails its own pod, so in practice there is one.
        let mut pods: Vec<Pod> = Vec::new();
        let mut known: Vec<(*const SourceInfo, usize)> = Vec::new();
        for record in records {
            let source = &record.entry.source;
            let at = match known.iter().find(|(ptr, _)| *ptr == Arc::as_ptr(source)) {
                Some(&(_, at)) => at,
                None => {
                    let identity: Vec<(&str, &str)> = source
                        .fields
                        .iter()
                        .filter(|(key, _)| is_identity(key))
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let at = match pods.iter().position(|p| p.identity == identity) {
                        Some(at) => at,
                        None => {
                            pods.push(Pod { identity, log_records: Vec::new() });
                            pods.len() - 1
                        }
                    };
                    known.push((Arc::as_ptr(source), at));
                    at
                }
            };
            pods[at].log_records.push(log_record(record));
        }

        let scope = InstrumentationScope {
            name: SCOPE.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let resource_logs = pods
            .into_iter()
            .map(|pod| ResourceLogs {
                resource: Some(self.resource(&pod.identity)),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope.clone()),
                    log_records: pod.log_records,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        let request = ExportLogsServiceRequest { resource_logs };
        out.reserve(request.encoded_len());
        request.encode(out).expect("prost fails only on a buffer without room, and a Vec grows");
    }

    fn content_type(&self) -> &'static str {
        "application/x-protobuf"
    }

    fn verdict(&self, body: &[u8], _sent: usize) -> Verdict {
        // The 2xx already says the collector took the request (OTLP/HTTP answers success
        // with 200 whatever the body). A body that does not decode, a proxy's page say,
        // cannot take that back, and sending again would duplicate every record.
        let Ok(response) = ExportLogsServiceResponse::decode(body) else {
            return Verdict::Delivered;
        };
        // A partial success rejecting nothing is a warning (the spec): still delivered.
        let Some(partial) = response.partial_success else {
            return Verdict::Delivered;
        };
        match u64::try_from(partial.rejected_log_records) {
            Ok(count) if count > 0 => {
                let reason = if partial.error_message.is_empty() {
                    "rejected by the collector".to_owned()
                } else {
                    partial.error_message
                };
                Verdict::Rejected { count, reason }
            }
            _ => Verdict::Delivered,
        }
    }
}

/// A source field that says which pod it is (`k8s.pod.name`...): a resource attribute.
/// Other fields describe the records and go on each one.
fn is_identity(key: &str) -> bool {
    key.starts_with("k8s.")
}

fn log_record(record: &Record<'_>) -> LogRecord {
    let e = record.entry;
    let path = e.file.path.as_str();
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut attributes =
        vec![text("log.file.path", path), text("log.file.name", name), text("log.source", &e.source.name)];
    attributes.extend(e.source.fields.iter().filter(|(key, _)| !is_identity(key)).map(|(k, v)| text(k, v)));
    if e.truncated {
        attributes.push(attribute("log.record.truncated", Value::BoolValue(true)));
    }
    LogRecord {
        // When the app wrote the line is in the line, in the app's own format, which is not
        // parsed: 0 is OTLP's "unknown", and the collector then goes by the observed time.
        time_unix_nano: 0,
        observed_time_unix_nano: e.time_ns,
        severity_number: e.severity.map_or(0, Severity::number),
        severity_text: e.severity.map_or("", Severity::text).to_owned(),
        body: Some(AnyValue { value: Some(Value::StringValue(record.text().into_owned())) }),
        attributes,
        ..Default::default()
    }
}

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn text(key: &str, value: &str) -> KeyValue {
    attribute(key, Value::StringValue(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess;

    use super::*;
    use crate::logship::record::Chunk;

    use crate::logship::record::testing::{self, T0};

    fn source(name: &str, fields: &[(&str, &str)]) -> Arc<SourceInfo> {
        let fields = fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Arc::new(SourceInfo { name: name.into(), fields, json: false })
    }

    /// `lines` read in this order from `/var/log/app/app.log`, a microsecond apart.
    fn chunk(lines: &[(&Arc<SourceInfo>, &str)]) -> Chunk {
        let file = testing::app_log();
        testing::chunk(&lines.iter().map(|(s, l)| (*s, &file, *l)).collect::<Vec<_>>())
    }

    fn export(otlp: &Otlp, chunk: &Chunk) -> ExportLogsServiceRequest {
        let records: Vec<Record> = (0..chunk.entries.len()).map(|i| chunk.record(i)).collect();
        let mut body = b"kept".to_vec();
        otlp.encode(&records, &mut body);
        assert_eq!(&body[..4], b"kept", "encode appends");
        ExportLogsServiceRequest::decode(&body[4..]).expect("an ExportLogsServiceRequest")
    }

    /// Attributes as `(key, value)`, string values as they are and others in debug form.
    fn attrs(kvs: &[KeyValue]) -> Vec<(String, String)> {
        kvs.iter()
            .map(|kv| {
                let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => s.clone(),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), value)
            })
            .collect()
    }

    fn body(record: &LogRecord) -> &str {
        match record.body.as_ref().and_then(|b| b.value.as_ref()) {
            Some(Value::StringValue(s)) => s,
            other => panic!("body {other:?}"),
        }
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn request_has_resource_scope_and_one_record_per_line() {
        let otlp = Otlp::new(pairs(&[("service.name", "web"), ("deployment.environment", "prod")]));
        let app = source(
            "app",
            &[("team", "checkout"), ("k8s.pod.name", "web-7f9c"), ("k8s.namespace.name", "shop")],
        );
        let mut chunk = chunk(&[(&app, "started"), (&app, "boom\n  at main")]);
        chunk.entries[1].truncated = true;
        chunk.entries[1].severity = Some(Severity::Error);

        let request = export(&otlp, &chunk);
        assert_eq!(request.resource_logs.len(), 1);
        let resource_logs = &request.resource_logs[0];
        assert_eq!(
            attrs(&resource_logs.resource.as_ref().unwrap().attributes),
            pairs(&[
                ("service.name", "web"),
                ("deployment.environment", "prod"),
                ("k8s.pod.name", "web-7f9c"),
                ("k8s.namespace.name", "shop"),
            ])
        );
        assert_eq!(resource_logs.scope_logs.len(), 1);
        let scope_logs = &resource_logs.scope_logs[0];
        let scope = scope_logs.scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("sidecar.logship", env!("CARGO_PKG_VERSION"))
        );

        let [plain, cut] = &scope_logs.log_records[..] else { panic!("two records") };
        assert_eq!((plain.time_unix_nano, plain.observed_time_unix_nano), (0, T0));
        assert_eq!((plain.severity_number, plain.severity_text.as_str()), (0, ""));
        assert_eq!(body(plain), "started");
        let common = [
            ("log.file.path", "/var/log/app/app.log"),
            ("log.file.name", "app.log"),
            ("log.source", "app"),
            ("team", "checkout"),
        ];
        assert_eq!(attrs(&plain.attributes), pairs(&common));

        assert_eq!((cut.time_unix_nano, cut.observed_time_unix_nano), (0, T0 + 1_000));
        assert_eq!((cut.severity_number, cut.severity_text.as_str()), (17, "ERROR"));
        assert_eq!(body(cut), "boom\n  at main");
        let mut expected = pairs(&common);
        expected.push(("log.record.truncated".into(), "Some(BoolValue(true))".into()));
        assert_eq!(attrs(&cut.attributes), expected);
        assert_eq!(otlp.content_type(), "application/x-protobuf");
        assert_eq!(otlp.content_encoding(), None);
    }

    #[test]
    fn invalid_utf8_is_replaced_in_the_body() {
        let app = source("app", &[]);
        let mut chunk = chunk(&[(&app, "bad ?")]);
        chunk.text[4] = 0xff;
        let request = export(&Otlp::new(Vec::new()), &chunk);
        let record = &request.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(body(record), "bad \u{fffd}");
    }

    #[test]
    fn one_resource_per_pod() {
        let otlp = Otlp::new(pairs(&[("service.name", "web"), ("k8s.pod.name", "configured")]));
        let app = source("app", &[("k8s.pod.name", "web-1")]);
        let nginx = source("nginx", &[("k8s.pod.name", "web-1"), ("team", "edge")]);
        let other = source("other", &[("k8s.pod.name", "web-2")]);
        let chunk = chunk(&[(&app, "a1"), (&other, "o1"), (&nginx, "n1"), (&app, "a2")]);

        let request = export(&otlp, &chunk);
        let [first, second] = &request.resource_logs[..] else { panic!("two pods") };
        let resource = |r: &ResourceLogs| attrs(&r.resource.as_ref().unwrap().attributes);
        let bodies = |r: &ResourceLogs| -> Vec<String> {
            r.scope_logs[0].log_records.iter().map(|l| body(l).to_owned()).collect()
        };
        // The pod's own name wins over a configured one: a key may appear only once.
        assert_eq!(resource(first), pairs(&[("service.name", "web"), ("k8s.pod.name", "web-1")]));
        assert_eq!(bodies(first), ["a1", "n1", "a2"]);
        assert_eq!(resource(second), pairs(&[("service.name", "web"), ("k8s.pod.name", "web-2")]));
        assert_eq!(bodies(second), ["o1"]);
    }

    fn answer(rejected: i64, message: &str) -> Vec<u8> {
        let partial =
            ExportLogsPartialSuccess { rejected_log_records: rejected, error_message: message.into() };
        ExportLogsServiceResponse { partial_success: Some(partial) }.encode_to_vec()
    }

    #[test]
    fn a_partial_success_counts_the_rejected() {
        let otlp = Otlp::new(Vec::new());
        assert_eq!(
            otlp.verdict(&answer(3, "log record too large"), 10),
            Verdict::Rejected { count: 3, reason: "log record too large".into() }
        );
        assert_eq!(
            otlp.verdict(&answer(2, ""), 10),
            Verdict::Rejected { count: 2, reason: "rejected by the collector".into() }
        );
        assert_eq!(otlp.verdict(&answer(0, "deprecated attribute"), 10), Verdict::Delivered, "a warning");
    }

    #[test]
    fn any_other_2xx_is_delivered() {
        let otlp = Otlp::new(Vec::new());
        assert_eq!(otlp.verdict(b"", 4), Verdict::Delivered);
        let full = ExportLogsServiceResponse { partial_success: None }.encode_to_vec();
        assert_eq!(otlp.verdict(&full, 4), Verdict::Delivered);
        assert_eq!(otlp.verdict(b"<html>ok</html>", 4), Verdict::Delivered);
    }
}
