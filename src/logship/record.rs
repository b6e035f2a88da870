//! What a sink is given: records read from the app's files, each a line (or a multi-line event)
//! with where it came from. Records live in chunks: one buffer of text per chunk, so reading
//! 800k lines a second is not 800k allocations.
//!
//! Not responsible for reading files (`tail`) or sending (`sink`).

use std::ops::Range;
use std::sync::Arc;

/// A source as the sinks see it: its name and the fields every record from it carries (the
/// config's static `fields`, then the pod's identity from the downward API).
#[derive(Debug)]
pub struct SourceInfo {
    pub name: String,
    /// `(key, value)` in a fixed order: static fields first, then `k8s.pod.name` and the rest.
    pub fields: Vec<(String, String)>,
    /// Whether lines are parsed as JSON objects (`format: json`).
    pub json: bool,
}

/// One file as the sinks see it.
#[derive(Debug)]
pub struct FileInfo {
    /// Unique within the process: a file truncated and written again is a new `FileInfo`.
    pub id: u64,
    /// The path it was found at (a rotated file keeps the name it was first read under).
    pub path: String,
    /// Stable across restarts and renames: the fingerprint, device and inode, in hex. With a
    /// record's offset it makes the record's id (`Record::id`), which Elasticsearch uses as
    /// `_id` so a replay is a 409, not a duplicate.
    pub key: String,
}

/// Severity, as OpenTelemetry numbers it (SeverityNumber: TRACE=1, DEBUG=5, INFO=9, WARN=13,
/// ERROR=17, FATAL=21), found in a JSON line's `level`/`severity`/`lvl` field or a text line's
/// first words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
}

impl Severity {
    pub fn number(self) -> i32 {
        match self {
            Severity::Trace => 1,
            Severity::Debug => 5,
            Severity::Info => 9,
            Severity::Warn => 13,
            Severity::Error => 17,
            Severity::Fatal => 21,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Severity::Trace => "TRACE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Warn => "WARN",
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }

    /// A level word as apps write it (`warn`, `WARNING`, `err`, `E`, `critical`...).
    pub fn parse(word: &[u8]) -> Option<Severity> {
        let mut lower = [0u8; 9];
        if word.is_empty() || word.len() > lower.len() {
            return None;
        }
        for (d, s) in lower.iter_mut().zip(word) {
            *d = s.to_ascii_lowercase();
        }
        Some(match &lower[..word.len()] {
            b"trace" | b"trc" | b"t" => Severity::Trace,
            b"debug" | b"dbg" | b"d" => Severity::Debug,
            b"info" | b"inf" | b"i" | b"notice" | b"information" => Severity::Info,
            b"warn" | b"warning" | b"wrn" | b"w" => Severity::Warn,
            b"error" | b"err" | b"e" | b"eror" => Severity::Error,
            b"fatal" | b"critical" | b"crit" | b"panic" | b"emerg" | b"alert" | b"f" => Severity::Fatal,
            _ => return None,
        })
    }
}

/// One record's place in its chunk and what was found out about it when it was read.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The record's bytes in `Chunk::text`: the line without its newline; a multi-line event's
    /// lines joined by `\n`.
    pub range: Range<usize>,
    pub file: Arc<FileInfo>,
    pub source: Arc<SourceInfo>,
    /// Offset of the record's first byte in the file.
    pub offset: u64,
    /// Offset just past the record (its newline included): the checkpoint once it is delivered.
    pub end: u64,
    /// Unix time in nanoseconds when the record was read.
    pub time_ns: u64,
    /// The line was longer than `max_line_bytes` and was cut there.
    pub truncated: bool,
    /// The line is a JSON object (only looked for with `format: json`).
    pub json_object: bool,
    pub severity: Option<Severity>,
    /// For a JSON object line: bit i set when the object already has the i-th of the
    /// sidecar's own keys (`doc::OWN_KEYS`, then the source's `fields`), which are then not
    /// added again.
    pub clashes: u64,
}

/// Records read together, shared by every sink (each holds an `Arc`).
#[derive(Debug, Default)]
pub struct Chunk {
    /// Numbered from 1 in reading order; sinks acknowledge chunks by this number.
    pub seq: u64,
    pub text: Vec<u8>,
    pub entries: Vec<Entry>,
    /// For each file read into this chunk (by `FileInfo::id`), the offset up to which every
    /// byte is in a record here or before, or was skipped: where its checkpoint may move once
    /// every sink has this chunk.
    pub ends: Vec<(u64, u64)>,
}

/// One record, as a sink's encoder reads it.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    pub line: &'a [u8],
    pub entry: &'a Entry,
}

impl Chunk {
    pub fn record(&self, i: usize) -> Record<'_> {
        let entry = &self.entries[i];
        Record { line: &self.text[entry.range.clone()], entry }
    }

    pub fn bytes(&self) -> usize {
        self.text.len()
    }
}

impl Record<'_> {
    /// The line as text; invalid UTF-8 is replaced (U+FFFD), as Vector and Fluent Bit do.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.line)
    }

    /// Deterministic across replays and restarts: the file's key and the record's offset.
    pub fn id(&self) -> String {
        format!("{}-{:x}", self.entry.file.key, self.entry.offset)
    }
}

/// Chunks built by hand, for the sinks' tests.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;

    use super::{Chunk, Entry, FileInfo, Record, SourceInfo};

    /// When the first test record was read; each next one a microsecond later.
    pub const T0: u64 = 1_700_000_000_123_456_789;

    /// The file most tests read from.
    pub fn app_log() -> Arc<FileInfo> {
        Arc::new(FileInfo { id: 1, path: "/var/log/app/app.log".into(), key: "c0ffee-801-2a".into() })
    }

    /// `lines` read in this order, a microsecond apart, each from its source and file.
    pub fn chunk(lines: &[(&Arc<SourceInfo>, &Arc<FileInfo>, &str)]) -> Chunk {
        let mut chunk = Chunk { seq: 1, ..Chunk::default() };
        let mut offset = 0;
        for (i, (source, file, line)) in lines.iter().enumerate() {
            let start = chunk.text.len();
            chunk.text.extend_from_slice(line.as_bytes());
            let end = offset + line.len() as u64 + 1;
            chunk.entries.push(Entry {
                range: start..chunk.text.len(),
                file: Arc::clone(file),
                source: Arc::clone(source),
                offset,
                end,
                time_ns: T0 + i as u64 * 1_000,
                truncated: false,
                json_object: false,
                severity: None,
                clashes: 0,
            });
            offset = end;
        }
        chunk
    }

    pub fn records(chunk: &Chunk) -> Vec<Record<'_>> {
        (0..chunk.entries.len()).map(|i| chunk.record(i)).collect()
    }
}
