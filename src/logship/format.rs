//! What each kind of sink puts on the wire and how it reads the answer. The `sink` module
//! does the rest (batching, the connection, retries, the dead-letter file) the same way for
//! every kind.

use std::time::Duration;

pub mod elasticsearch;
pub mod http;
pub mod loki;
pub mod otlp;

use super::record::Record;

/// How a sink's receiver answered a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every record is delivered (or, for Elasticsearch, was already there: a 409 on `create`).
    Delivered,
    /// Nothing was taken, and it may be later (429, 5xx, 408, or a connection that failed):
    /// send the same records again after a backoff, or after `after` (`Retry-After`).
    RetryAll { reason: String, after: Option<Duration> },
    /// Nothing was taken, and never will be (a 4xx other than 408/429): every record goes to
    /// the dead-letter file with `reason`.
    RefuseAll { reason: String },
    /// Some records failed: `retry` (indices into the request's records) are sent again alone;
    /// `refused` go to the dead-letter file with their reason; the rest are delivered.
    /// Elasticsearch's `_bulk` answers this way.
    Partial { retry: Vec<usize>, refused: Vec<(usize, String)> },
    /// The receiver took the request but rejected `count` records without saying which
    /// (OTLP's partial success): counted and logged, never retried.
    Rejected { count: u64, reason: String },
}

/// One kind of sink's wire format.
pub trait Format: Send + Sync {
    /// The request body for `records`, appended to `out` (already compressed when the format
    /// demands a compression of its own, as Loki's protobuf does with snappy).
    fn encode(&self, records: &[Record<'_>], out: &mut Vec<u8>);

    /// `Content-Type` of what `encode` writes.
    fn content_type(&self) -> &'static str;

    /// `Content-Encoding` that `encode` has already applied, if any. The sink's own `gzip`
    /// compression is applied after `encode`, only when this is `None`.
    fn content_encoding(&self) -> Option<&'static str> {
        None
    }

    /// What a 2xx answer with `body` means for the `sent` records (most formats: all
    /// delivered). Non-2xx answers are judged by [`status_verdict`] before this is asked.
    fn verdict(&self, _body: &[u8], _sent: usize) -> Verdict {
        Verdict::Delivered
    }
}

/// The verdict for a status outside 2xx, by the rules Loki, Elasticsearch and OTLP share:
/// 408, 429 and 5xx are retried (after `Retry-After` when given), other 4xx refused for good.
pub fn status_verdict(status: u16, body: &[u8], retry_after: Option<Duration>) -> Verdict {
    let reason = format!("HTTP {status}: {}", snippet(body));
    match status {
        408 | 429 | 500..=599 => Verdict::RetryAll { reason, after: retry_after },
        _ => Verdict::RefuseAll { reason },
    }
}

/// The start of an answer's body, for a reason: one line, at most 200 characters.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `Retry-After` (RFC 9110 §10.2.3): seconds, or an HTTP date.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate(value)?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form RFC 9110 requires senders use.
fn httpdate(value: &str) -> Option<std::time::SystemTime> {
    let rfc3339 = {
        let mut parts = value.split_whitespace();
        let _weekday = parts.next()?;
        let day: u32 = parts.next()?.parse().ok()?;
        let month = match parts.next()? {
            "Jan" => 1,
            "Feb" => 2,
            "Mar" => 3,
            "Apr" => 4,
            "May" => 5,
            "Jun" => 6,
            "Jul" => 7,
            "Aug" => 8,
            "Sep" => 9,
            "Oct" => 10,
            "Nov" => 11,
            "Dec" => 12,
            _ => return None,
        };
        let year: u32 = parts.next()?.parse().ok()?;
        let time = parts.next()?;
        (parts.next()? == "GMT").then_some(())?;
        format!("{year:04}-{month:02}-{day:02}T{time}Z")
    };
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_lokis_rules() {
        assert!(matches!(status_verdict(429, b"slow down", None), Verdict::RetryAll { .. }));
        assert!(matches!(status_verdict(503, b"", None), Verdict::RetryAll { .. }));
        assert!(matches!(status_verdict(408, b"", None), Verdict::RetryAll { .. }));
        assert_eq!(
            status_verdict(400, b"entry out of order\n  for stream", None),
            Verdict::RefuseAll { reason: "HTTP 400: entry out of order for stream".into() }
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = humantime::parse_rfc3339("1994-11-06T08:49:30Z").unwrap();
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
    }
}
