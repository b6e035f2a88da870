//! Bytes read from a file → records: lines split at `\n`, joined into multi-line events by a
//! start pattern, cut at `max_line_bytes`, and looked at once (JSON object? which level?).
//!
//! The bytes are read straight into the chunk's buffer and records are ranges of it, so a line
//! is copied only when it is still incomplete at the end of a read (its start is carried into
//! the next chunk). Not responsible for which file is read when (`tail`).

use std::sync::Arc;
use std::time::Instant;

use regex::bytes::Regex;
use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};

use super::doc::OWN_KEYS;
use super::record::{Chunk, Entry, FileInfo, Severity, SourceInfo};

/// How one source's lines are cut and read.
pub struct Shape {
    pub info: Arc<SourceInfo>,
    pub multiline: Option<Regex>,
    pub multiline_timeout: std::time::Duration,
    pub max_line: usize,
    /// The keys a JSON line is checked for (`doc::OWN_KEYS`, then the source's fields).
    keys: Vec<String>,
}

impl Shape {
    pub fn new(
        info: Arc<SourceInfo>,
        multiline: Option<Regex>,
        multiline_timeout: std::time::Duration,
        max_line: usize,
    ) -> Self {
        let keys = OWN_KEYS
            .iter()
            .map(|k| (*k).to_owned())
            .chain(info.fields.iter().map(|(k, _)| k.clone()))
            .collect();
        Shape { info, multiline, multiline_timeout, max_line, keys }
    }
}

/// What is carried from one read of a file to the next.
#[derive(Default)]
pub struct Carry {
    /// Bytes not yet made into records: an incomplete last line, or a multi-line event that
    /// may still grow, with the incomplete line after it.
    pub bytes: Vec<u8>,
    /// The rest of a line cut at `max_line` is being skipped up to its newline.
    pub discarding: bool,
    /// The rest of a multi-line event cut at `max_line` is being skipped up to the next
    /// start line.
    pub skipping_event: bool,
    /// When the pending multi-line event last grew.
    pub grew: Option<Instant>,
}

/// What one pass over a file's bytes gave.
pub struct Split {
    pub records: u64,
    pub truncated: u64,
    /// File offset up to which every byte is in a record or was skipped: the position this
    /// chunk can take the checkpoint to.
    pub consumed: u64,
}

/// Where a file's bytes are in the chunk being split.
pub struct Segment {
    /// Index in `chunk.text` of the file's first byte: the carry, then what was just read.
    pub seg: usize,
    /// File offset of that byte.
    pub base: u64,
    /// When the bytes were read (Unix nanoseconds).
    pub time_ns: u64,
    /// The file will not grow for now (the multi-line timeout passed, or it was rotated away
    /// and is closing): the pending event and an incomplete last line are records too.
    pub flush: bool,
}

/// Makes records of the file's bytes at the end of `chunk.text`. What cannot be a record yet
/// is moved into `carry` and cut off the buffer.
pub fn split(
    chunk: &mut Chunk,
    at: Segment,
    shape: &Shape,
    file: &Arc<FileInfo>,
    carry: &mut Carry,
) -> Split {
    let Segment { seg, base, time_ns, flush } = at;
    let mut out = Emit { chunk, shape, file, base, seg, time_ns, records: 0, truncated: 0 };
    let mut pos = seg;
    let len = out.chunk.text.len();
    // The rest of a line cut short before: skip to its end.
    if carry.discarding {
        match memchr::memchr(b'\n', &out.chunk.text[pos..]) {
            Some(i) => {
                pos += i + 1;
                carry.discarding = false;
            }
            None => pos = len,
        }
    }
    // Multi-line: the event being built, as (start, end) in the buffer, end before its newline.
    let mut event: Option<(usize, usize)> = None;
    let mut grew = false;
    while let Some(i) = memchr::memchr(b'\n', &out.chunk.text[pos..len]) {
        let (start, end) = (pos, pos + i);
        pos = end + 1;
        let Some(re) = &shape.multiline else {
            out.line(start, end);
            continue;
        };
        let starts = re.is_match(&out.chunk.text[start..end]);
        if carry.skipping_event {
            if !starts {
                continue;
            }
            carry.skipping_event = false;
        }
        match event {
            Some((s, _)) if !starts => {
                event = Some((s, end));
                grew = true;
            }
            _ => {
                if let Some((s, e)) = event {
                    out.line(s, e);
                }
                event = Some((start, end));
                grew = true;
            }
        }
        // A runaway event (a stack trace without end) is cut like a long line, and the rest
        // of it skipped.
        if let Some((s, e)) = event
            && e - s > shape.max_line
        {
            out.line(s, e);
            event = None;
            carry.skipping_event = true;
        }
    }
    // What is left: the pending event, then an incomplete line.
    let tail = event.map_or(pos, |(s, _)| s);
    if flush {
        if let Some((s, e)) = event {
            out.line(s, e);
        }
        if pos < len {
            out.line(pos, len);
        }
        carry.bytes.clear();
        carry.grew = None;
    } else if len - pos > shape.max_line && event.is_none() {
        // An incomplete line already over the limit: its first part is a record now, the
        // rest is skipped when it comes, so one endless line can neither grow memory nor
        // stop the file.
        out.line(pos, len);
        carry.discarding = true;
        carry.bytes.clear();
    } else {
        carry.bytes.clear();
        carry.bytes.extend_from_slice(&out.chunk.text[tail..len]);
        if grew {
            carry.grew = Some(Instant::now());
        } else if event.is_none() {
            carry.grew = None;
        }
    }
    let kept = if flush || carry.discarding { len } else { tail };
    let (records, truncated) = (out.records, out.truncated);
    chunk_cut(out.chunk, kept, len);
    Split { records, truncated, consumed: base + (kept - seg) as u64 }
}

/// Carried bytes leave the buffer; records only point before `kept`.
fn chunk_cut(chunk: &mut Chunk, kept: usize, len: usize) {
    if kept < len {
        chunk.text.truncate(kept);
    }
}

struct Emit<'a> {
    chunk: &'a mut Chunk,
    shape: &'a Shape,
    file: &'a Arc<FileInfo>,
    base: u64,
    seg: usize,
    time_ns: u64,
    records: u64,
    truncated: u64,
}

impl Emit<'_> {
    /// `text[start..end]` (a line without its newline, or an event) as a record. Blank lines
    /// are skipped.
    fn line(&mut self, start: usize, end: usize) {
        let file_end = self.base + (end - self.seg) as u64 + 1;
        let mut range = start..end;
        let text = &self.chunk.text;
        // CRLF line ends; spaces are the app's and stay.
        if range.end > range.start && text[range.end - 1] == b'\r' {
            range.end -= 1;
        }
        if range.is_empty() {
            return;
        }
        let truncated = range.len() > self.shape.max_line;
        if truncated {
            range.end = range.start + self.shape.max_line;
            self.truncated += 1;
        }
        let line = &text[range.clone()];
        let (json_object, clashes, level) = if self.shape.info.json && !truncated {
            look_at_json(line, &self.shape.keys)
        } else {
            (false, 0, None)
        };
        let severity = level.or_else(|| if json_object { None } else { text_severity(line) });
        self.chunk.entries.push(Entry {
            offset: self.base + (start - self.seg) as u64,
            end: file_end.min(self.base + (self.chunk.text.len() - self.seg) as u64),
            range,
            file: self.file.clone(),
            source: self.shape.info.clone(),
            time_ns: self.time_ns,
            truncated,
            json_object,
            severity,
            clashes,
        });
        self.records += 1;
    }
}

/// Whether `line` is one JSON object, which of `keys` it has at the top (bit i for keys[i]),
/// and its level field. One pass of serde_json that keeps nothing but those.
fn look_at_json(line: &[u8], keys: &[String]) -> (bool, u64, Option<Severity>) {
    if line.first() != Some(&b'{') {
        return (false, 0, None);
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    match de.deserialize_map(TopLevel { keys }) {
        Ok((clashes, level)) if de.end().is_ok() => (true, clashes, level),
        _ => (false, 0, None),
    }
}

struct TopLevel<'k> {
    keys: &'k [String],
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = (u64, Option<Severity>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut clashes, mut level) = (0u64, None);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if let Some(i) = self.keys.iter().position(|k| *k == *key)
                && i < 64
            {
                clashes |= 1 << i;
            }
            if matches!(&*key, "level" | "severity" | "lvl" | "loglevel" | "log.level") {
                if let serde_json::Value::String(s) = map.next_value::<serde_json::Value>()? {
                    level = Severity::parse(s.as_bytes());
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok((clashes, level))
    }
}

/// A level word among a text line's first few words: `2026-12-03 10:00:00 ERROR boom`,
/// `[WARN] disk`, `level=info msg=...`.
fn text_severity(line: &[u8]) -> Option<Severity> {
    let head = &line[..line.len().min(80)];
    head.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()).take(5).find_map(|w| {
        let w = w.strip_prefix(b"level=").unwrap_or(w);
        let w = w.trim_ascii();
        let trimmed = w
            .strip_prefix(b"[")
            .unwrap_or(w)
            .strip_suffix(b"]")
            .or_else(|| w.strip_suffix(b":"))
            .unwrap_or_else(|| w.strip_prefix(b"[").unwrap_or(w));
        // One-letter levels only inside brackets: `I` or `E` alone is too often a word.
        if trimmed.len() == 1 && !w.starts_with(b"[") {
            return None;
        }
        Severity::parse(trimmed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(json: bool, multiline: Option<&str>, max_line: usize) -> Shape {
        let info =
            Arc::new(SourceInfo { name: "app".into(), fields: vec![("team".into(), "shop".into())], json });
        Shape::new(
            info,
            multiline.map(|p| Regex::new(p).unwrap()),
            std::time::Duration::from_secs(1),
            max_line,
        )
    }

    fn file() -> Arc<FileInfo> {
        Arc::new(FileInfo { id: 1, path: "/l/a.log".into(), key: "k".into() })
    }

    /// A record as the tests compare it: text, offset, end, truncated.
    type Seen = (String, u64, u64, bool);

    /// Feeds `reads` one after another as the tailer would; returns the records and the last split.
    fn feed(shape: &Shape, reads: &[&[u8]], flush_last: bool) -> (Vec<Seen>, Split, Carry) {
        let (f, mut carry, mut base) = (file(), Carry::default(), 0u64);
        let mut all = Vec::new();
        let mut last = None;
        for (i, read) in reads.iter().enumerate() {
            let mut chunk = Chunk::default();
            chunk.text.extend_from_slice(b"other file's bytes");
            let seg = chunk.text.len();
            chunk.text.extend_from_slice(&carry.bytes);
            chunk.text.extend_from_slice(read);
            let at = Segment { seg, base, time_ns: 7, flush: flush_last && i == reads.len() - 1 };
            let s = split(&mut chunk, at, shape, &f, &mut carry);
            base = s.consumed;
            for r in 0..chunk.entries.len() {
                let rec = chunk.record(r);
                all.push((rec.text().into_owned(), rec.entry.offset, rec.entry.end, rec.entry.truncated));
            }
            last = Some(s);
        }
        (all, last.unwrap(), carry)
    }

    #[test]
    fn lines_split_across_reads_keep_their_offsets() {
        let (recs, s, carry) = feed(&shape(false, None, 100), &[b"one\ntw", b"o\r\n\nthree\nfo"], false);
        assert_eq!(
            recs,
            [("one".into(), 0, 4, false), ("two".into(), 4, 9, false), ("three".into(), 10, 16, false)]
        );
        assert_eq!(s.consumed, 16);
        assert_eq!(carry.bytes, b"fo");
    }

    #[test]
    fn a_long_line_is_cut_and_the_rest_skipped_without_growing_memory() {
        let sh = shape(false, None, 10);
        let (recs, s, carry) = feed(&sh, &[b"0123456789abcdef", b"ghij", b"klm\nnext\n"], false);
        assert_eq!(recs[0], ("0123456789".into(), 0, 16, true));
        assert_eq!(recs[1].0, "next");
        assert_eq!(recs.len(), 2);
        assert_eq!(s.consumed, 29);
        assert!(carry.bytes.is_empty() && !carry.discarding);
    }

    #[test]
    fn multiline_events_join_until_the_next_start_and_flush_at_the_end() {
        let sh = shape(false, Some(r"^\S"), 1000);
        let text: &[u8] = b"Exception: boom\n  at a()\n  at b()\nnext event\n  at c()\n";
        let (recs, s, carry) = feed(&sh, &[text], false);
        assert_eq!(recs, [("Exception: boom\n  at a()\n  at b()".into(), 0, 34, false)]);
        assert_eq!(s.consumed, 34);
        assert_eq!(carry.bytes, b"next event\n  at c()\n");
        let (recs, s, _) = feed(&sh, &[text], true);
        assert_eq!(recs[1], ("next event\n  at c()".into(), 34, 54, false));
        assert_eq!(s.consumed, 54);
    }

    #[test]
    fn a_runaway_multiline_event_is_one_cut_record_and_its_rest_is_skipped() {
        let sh = shape(false, Some(r"^\S"), 20);
        let (recs, _, _) =
            feed(&sh, &[b"E1 start\n  a 1\n  a 2\n", b"  a 3\n  a 4\nE2 next\n  b\nE3\n"], true);
        let texts: Vec<&str> = recs.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(texts, ["E1 start\n  a 1\n  a 2", "E2 next\n  b", "E3"]);
        assert!(recs[0].3);
    }

    #[test]
    fn json_lines_are_checked_once_for_our_keys_and_their_level() {
        let keys: Vec<String> = ["timestamp", "source", "file", "team"].map(String::from).to_vec();
        assert_eq!(look_at_json(br#"{"msg":"a","level":"warn"}"#, &keys), (true, 0, Some(Severity::Warn)));
        assert_eq!(look_at_json(br#"{"timestamp":1,"team":"x"}"#, &keys), (true, 0b1001, None));
        assert!(!look_at_json(br#"{"a":1} trailing"#, &keys).0);
        assert!(!look_at_json(br#"[1,2]"#, &keys).0);
        assert!(look_at_json(br#"{"a":"\u00e9\"x"}"#, &keys).0);
    }

    #[test]
    fn text_levels_are_found_among_the_first_words() {
        assert_eq!(text_severity(b"2026-12-03T10:00:00Z ERROR boom"), Some(Severity::Error));
        assert_eq!(text_severity(b"[WARN] disk almost full"), Some(Severity::Warn));
        assert_eq!(text_severity(b"level=info msg=started"), Some(Severity::Info));
        assert_eq!(text_severity(b"I went home"), None);
        assert_eq!(text_severity(b"a b c d e f ERROR"), None);
    }
}
