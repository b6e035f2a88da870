//! Elasticsearch's `_bulk` API: NDJSON, a `create` action then the record's document (`doc`)
//! for each record; and the per-item answer, read into which records to send again and which
//! to give up on.
//!
//! `create` with the record's deterministic id (`Record::id`) makes a replay harmless: a
//! document already indexed answers 409 and counts as delivered, never as a duplicate. That
//! is also why an answer that cannot be read is retried whole.

use std::collections::HashMap;

use serde::Deserialize;

use super::{Format, Verdict, snippet};
use crate::logship::doc;
use crate::logship::record::Record;
use crate::telemetry::access_log::format::{Stamps, string};

/// The Elasticsearch sink's wire format.
pub struct Elasticsearch {
    /// `{"create":{"_index":"<index>","_id":`, the index escaped once.
    action: Vec<u8>,
}

/// What the verdict reads first: the common answer, `errors: false`, is then judged without
/// building an item per record (serde skips the rest).
#[derive(Deserialize)]
struct Summary {
    errors: bool,
}

/// The rest of a `_bulk` answer, read only when some item failed.
#[derive(Deserialize)]
struct Bulk {
    /// One per action, in request order, each under its action's name (`create` here, but
    /// the name is not needed to judge it).
    items: Vec<HashMap<String, Item>>,
}

#[derive(Deserialize)]
struct Item {
    status: u16,
    #[serde(default)]
    error: Option<ItemError>,
}

#[derive(Deserialize)]
struct ItemError {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

impl Elasticsearch {
    pub fn new(index: String) -> Elasticsearch {
        let mut action = b"{\"create\":{\"_index\":".to_vec();
        string(&mut action, &index);
        action.extend_from_slice(b",\"_id\":");
        Elasticsearch { action }
    }
}

impl Format for Elasticsearch {
    fn encode(&self, records: &[Record<'_>], out: &mut Vec<u8>) {
        let mut stamps = Stamps::default();
        for record in records {
            out.extend_from_slice(&self.action);
            string(out, &record.id());
            out.extend_from_slice(b"}}\n");
            let start = out.len();
            doc::write(out, &mut stamps, record);
            if record.entry.json_object {
                // A JSON object is copied byte for byte, and a multi-line event can be a
                // pretty-printed one: a raw newline would split the document in two bulk
                // lines. Outside strings (which cannot hold a raw newline) it is whitespace,
                // so a space means the same.
                for b in &mut out[start..] {
                    if *b == b'\n' {
                        *b = b' ';
                    }
                }
            }
            out.push(b'\n');
        }
    }

    fn content_type(&self) -> &'static str {
        "application/x-ndjson"
    }

    fn verdict(&self, body: &[u8], sent: usize) -> Verdict {
        let unreadable = |what: String| Verdict::RetryAll {
            reason: format!("unreadable bulk response ({what}): {}", snippet(body)),
            after: None,
        };
        match serde_json::from_slice::<Summary>(body) {
            Ok(Summary { errors: false }) => return Verdict::Delivered,
            Ok(Summary { errors: true }) => {}
            Err(e) => return unreadable(e.to_string()),
        }
        let items = match serde_json::from_slice::<Bulk>(body) {
            Ok(bulk) => bulk.items,
            Err(e) => return unreadable(e.to_string()),
        };
        if items.len() != sent {
            // Answers cannot be matched to records; `create` makes sending all again safe.
            return Verdict::RetryAll {
                reason: format!("bulk response has {} items for {sent} records", items.len()),
                after: None,
            };
        }
        let mut retry = Vec::new();
        let mut refused = Vec::new();
        for (i, actions) in items.into_iter().enumerate() {
            let count = actions.len();
            let Some(item) = actions.into_values().next().filter(|_| count == 1) else {
                return unreadable(format!("item {i} has {count} actions"));
            };
            match item.status {
                // 409 on `create`: the document is already there, from an earlier send.
                200..=299 | 409 => {}
                429 | 500..=599 => retry.push(i),
                status => refused.push((i, item.reason(status))),
            }
        }
        if retry.is_empty() && refused.is_empty() {
            Verdict::Delivered
        } else {
            Verdict::Partial { retry, refused }
        }
    }
}

impl Item {
    /// `400 mapper_parsing_exception: failed to parse field [level]`.
    fn reason(&self, status: u16) -> String {
        let error = self.error.as_ref();
        let kind = error.and_then(|e| e.kind.as_deref()).unwrap_or("unknown error");
        match error.and_then(|e| e.reason.as_deref()) {
            Some(reason) => format!("{status} {kind}: {reason}"),
            None => format!("{status} {kind}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::logship::record::{Chunk, SourceInfo};

    use crate::logship::record::testing::{self, records};

    fn source(name: &str, fields: &[(&str, &str)]) -> Arc<SourceInfo> {
        let fields = fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Arc::new(SourceInfo { name: name.into(), fields, json: false })
    }

    /// `lines` read from one file in this order, a microsecond apart.
    fn chunk(source: &Arc<SourceInfo>, lines: &[&str]) -> Chunk {
        let file = testing::app_log();
        testing::chunk(&lines.iter().map(|l| (source, &file, *l)).collect::<Vec<_>>())
    }

    fn body(es: &Elasticsearch, chunk: &Chunk) -> Vec<u8> {
        let mut out = Vec::new();
        es.encode(&records(chunk), &mut out);
        out
    }

    /// The body's lines, each parsed back.
    fn lines(body: &[u8]) -> Vec<serde_json::Value> {
        assert_eq!(body.last(), Some(&b'\n'), "the bulk API wants a final newline");
        body[..body.len() - 1].split(|&b| b == b'\n').map(|l| serde_json::from_slice(l).unwrap()).collect()
    }

    #[test]
    fn body_is_a_create_action_then_the_document_per_record() {
        let es = Elasticsearch::new("logs-app".into());
        let app = source("app", &[("team", "checkout")]);
        let chunk = chunk(&app, &["started", "say \"hi\"\n  at main"]);

        let lines = lines(&body(&es, &chunk));
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], serde_json::json!({"create": {"_index": "logs-app", "_id": "c0ffee-801-2a-0"}}));
        assert_eq!(lines[2], serde_json::json!({"create": {"_index": "logs-app", "_id": "c0ffee-801-2a-8"}}));
        assert_eq!(
            lines[1],
            serde_json::json!({
                "timestamp": "2023-11-14T22:13:20.123Z", "source": "app",
                "file": "/var/log/app/app.log", "team": "checkout", "message": "started"
            })
        );
        assert_eq!(lines[3]["message"], "say \"hi\"\n  at main");
        assert_eq!(es.content_type(), "application/x-ndjson");
        assert_eq!(es.content_encoding(), None);
    }

    #[test]
    fn ids_are_the_same_on_every_send() {
        let es = Elasticsearch::new("logs".into());
        let app = source("app", &[]);
        let chunk = chunk(&app, &["a", "b", "c"]);

        let first = body(&es, &chunk);
        assert_eq!(first, body(&es, &chunk), "a replay is the same request, so its creates are 409s");
        let ids: Vec<String> = lines(&first)
            .iter()
            .step_by(2)
            .map(|a| a["create"]["_id"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = records(&chunk).iter().map(|r| r.id()).collect();
        assert_eq!(ids, expected);
        assert_eq!(ids, ["c0ffee-801-2a-0", "c0ffee-801-2a-2", "c0ffee-801-2a-4"]);
    }

    #[test]
    fn a_pretty_printed_json_object_stays_on_one_line() {
        let es = Elasticsearch::new("logs".into());
        let app = source("app", &[]);
        let mut chunk = chunk(&app, &["{\n  \"level\": \"info\",\n  \"msg\": \"a\\nb\"\n}"]);
        chunk.entries[0].json_object = true;

        let lines = lines(&body(&es, &chunk));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["level"], "info");
        assert_eq!(lines[1]["msg"], "a\nb");
        assert_eq!(lines[1]["source"], "app");
    }

    #[test]
    fn the_index_is_escaped_once() {
        let es = Elasticsearch::new("odd\"name".into());
        let chunk = chunk(&source("app", &[]), &["x"]);
        assert_eq!(lines(&body(&es, &chunk))[0]["create"]["_index"], "odd\"name");
    }

    fn es() -> Elasticsearch {
        Elasticsearch::new("logs".into())
    }

    #[test]
    fn a_mixed_answer_retries_and_refuses_item_by_item() {
        let answer = br#"{"took":30,"errors":true,"items":[
            {"create":{"_index":"logs","_id":"a","status":201,"result":"created"}},
            {"create":{"_index":"logs","_id":"b","status":409,"error":{"type":"version_conflict_engine_exception","reason":"[b]: version conflict, document already exists"}}},
            {"create":{"_index":"logs","_id":"c","status":429,"error":{"type":"es_rejected_execution_exception","reason":"rejected execution"}}},
            {"create":{"_index":"logs","_id":"d","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [level] of type [long]"}}},
            {"create":{"_index":"logs","_id":"e","status":503,"error":{"type":"unavailable_shards_exception","reason":"primary shard is not active"}}},
            {"create":{"_index":"logs","_id":"f","status":200}},
            {"create":{"_index":"logs","_id":"g","status":404,"error":{"type":"index_not_found_exception"}}}
        ]}"#;
        assert_eq!(
            es().verdict(answer, 7),
            Verdict::Partial {
                retry: vec![2, 4],
                refused: vec![
                    (3, "400 mapper_parsing_exception: failed to parse field [level] of type [long]".into()),
                    (6, "404 index_not_found_exception".into()),
                ],
            }
        );
    }

    #[test]
    fn errors_false_is_delivered_without_reading_items() {
        assert_eq!(es().verdict(br#"{"took":3,"errors":false,"items":[]}"#, 5), Verdict::Delivered);
        assert_eq!(es().verdict(br#"{"errors":false}"#, 5), Verdict::Delivered);
    }

    #[test]
    fn errors_only_from_replays_are_delivered() {
        let answer = br#"{"errors":true,"items":[
            {"create":{"status":409,"error":{"type":"version_conflict_engine_exception","reason":"exists"}}},
            {"index":{"status":201}}
        ]}"#;
        assert_eq!(es().verdict(answer, 2), Verdict::Delivered);
    }

    fn retried_because(verdict: Verdict) -> String {
        match verdict {
            Verdict::RetryAll { reason, after: None } => reason,
            other => panic!("expected RetryAll, got {other:?}"),
        }
    }

    #[test]
    fn an_unreadable_answer_is_retried_whole() {
        let reason = retried_because(es().verdict(b"<html>502 Bad Gateway</html>", 2));
        assert!(reason.starts_with("unreadable bulk response (expected value"), "{reason}");
        assert!(reason.ends_with(": <html>502 Bad Gateway</html>"), "{reason}");

        let reason = retried_because(es().verdict(br#"{"acknowledged":true}"#, 2));
        assert!(reason.contains("missing field `errors`"), "{reason}");

        let reason = retried_because(es().verdict(br#"{"errors":true,"items":[{"create":{"_id":"a"}}]}"#, 1));
        assert!(reason.contains("missing field `status`"), "{reason}");

        let two = br#"{"errors":true,"items":[{"create":{"status":201},"index":{"status":400}}]}"#;
        assert!(retried_because(es().verdict(two, 1)).contains("item 0 has 2 actions"));
    }

    #[test]
    fn an_answer_for_another_number_of_records_is_retried_whole() {
        let answer = br#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":400}}]}"#;
        assert_eq!(retried_because(es().verdict(answer, 3)), "bulk response has 2 items for 3 records");
    }
}
