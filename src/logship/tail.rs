//! Which files are read, from where, and when they are let go.
//!
//! A file is known by its fingerprint (a checksum of its first line, up to 256 bytes), with
//! device and inode as the tie-break, so every way logs get rotated is one of a few cases:
//! - renamed (and a new file created): same inode, read on through the open handle, wherever
//!   its name went, until it has not grown for `rotate_wait`;
//! - deleted: the open handle still reads it to its end, then it is let go;
//! - copied and truncated (`copytruncate`): the copy has the old fingerprint and a new inode,
//!   and is read from where the original had got to; the original is read again from 0;
//! - truncated (or overwritten): smaller than where reading had got to, or its first line
//!   changed: read again from 0, as a new generation, and what was never read is counted lost.
//!
//! Not responsible for splitting lines (`lines`), or for delivery and checkpoints (`pipeline`).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::checkpoint::Mark;
use super::lines::{self, Carry, Segment};
use super::metrics::SourceMetrics;
use super::record::{Chunk, FileInfo};
use crate::config::logship::{LogshipConfig, ReadFrom};

/// A fingerprint covers the first line, or this many bytes of a file whose first line is
/// longer. Vector's default too.
const FINGERPRINT_BYTES: usize = 256;
/// Most read from one file before the others get a turn; small, so the shipper's thread is
/// never long in a `pread` the scheduler cannot interrupt for a proxy worker.
const READ_BYTES: usize = 64 << 10;
/// A chunk goes to the sinks once it holds this much.
pub const CHUNK_BYTES: usize = 1 << 20;
/// A truncated file's old fingerprint is remembered this long, for its copy to be found.
const TRUNCATION_MEMORY: Duration = Duration::from_secs(60);

/// Where each file stands, shared with the pipeline, which moves `offset` as sinks deliver.
#[derive(Default)]
pub struct Progress {
    pub marks: HashMap<u64, Mark>,
    /// Files let go: their mark goes once delivered up to here.
    pub closing: HashMap<u64, u64>,
    pub changed: bool,
}

impl Progress {
    pub fn snapshot(&self) -> Vec<Mark> {
        let mut v: Vec<Mark> = self.marks.values().cloned().collect();
        v.sort_by(|a, b| (&a.source, &a.path, a.ino).cmp(&(&b.source, &b.path, b.ino)));
        v
    }

    /// Applies a delivered chunk's ends.
    pub fn delivered(&mut self, ends: &[(u64, u64)]) {
        for &(id, end) in ends {
            if let Some(m) = self.marks.get_mut(&id)
                && end > m.offset
            {
                m.offset = end;
                self.changed = true;
            }
            if let Some(&last) = self.closing.get(&id)
                && self.marks.get(&id).is_none_or(|m| m.offset >= last)
            {
                self.closing.remove(&id);
                self.marks.remove(&id);
                self.changed = true;
            }
        }
    }
}

pub struct Source {
    pub name: String,
    pub paths: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    pub shape: lines::Shape,
    pub metrics: SourceMetrics,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    hash: u64,
    len: u32,
}

struct Tracked {
    source: usize,
    path: PathBuf,
    file: File,
    dev: u64,
    ino: u64,
    /// `None` until the first line is complete; nothing is read before.
    fp: Option<Fingerprint>,
    info: Option<Arc<FileInfo>>,
    /// Next byte to read; the carry holds the bytes just before it.
    read_pos: u64,
    carry: Carry,
    size: u64,
    /// The last read found nothing more.
    at_eof: bool,
    grew: Instant,
    /// Not found by the last scan (renamed away or deleted) since then.
    gone: Option<Instant>,
}

impl Tracked {
    /// Every byte before this is in a chunk or skipped.
    fn consumed(&self) -> u64 {
        self.read_pos - self.carry.bytes.len() as u64
    }
}

pub struct Tail {
    sources: Vec<Source>,
    files: Vec<Tracked>,
    /// Marks from the last run not yet matched to a file (the first scan matches them).
    restored: Vec<Mark>,
    /// No checkpoint existed: files found by the first scan start at `read_from`.
    first_start: bool,
    scanned: bool,
    read_from: ReadFrom,
    rotate_wait: Duration,
    /// Fingerprint, inode and where reading had got, of files truncated lately.
    truncations: Vec<(Fingerprint, u64, u64, Instant)>,
    progress: Arc<Mutex<Progress>>,
    next_id: u64,
    /// Where the next read round starts, so every file gets its turn.
    turn: usize,
}

impl Tail {
    pub fn new(
        config: &LogshipConfig,
        sources: Vec<Source>,
        restored: Option<Vec<Mark>>,
        progress: Arc<Mutex<Progress>>,
    ) -> Tail {
        Tail {
            sources,
            files: Vec::new(),
            first_start: restored.is_none(),
            restored: restored.unwrap_or_default(),
            scanned: false,
            read_from: config.read_from,
            rotate_wait: config.rotate_wait,
            truncations: Vec::new(),
            progress,
            next_id: 1,
            turn: 0,
        }
    }

    /// Finds new files, notices renamed, deleted and truncated ones, lets go of finished ones
    /// and updates the gauges. Called every `scan_interval`.
    pub fn scan(&mut self, chunk: &mut Chunk) {
        let now = Instant::now();
        self.truncations.retain(|(.., at)| now.duration_since(*at) < TRUNCATION_MEMORY);
        for f in &mut self.files {
            f.gone.get_or_insert(now);
        }
        let mut found: Vec<(usize, PathBuf, std::fs::Metadata)> = Vec::new();
        for (si, source) in self.sources.iter().enumerate() {
            for pattern in &source.paths {
                let Ok(paths) = glob::glob(pattern) else { continue };
                for path in paths.flatten() {
                    if source.exclude.iter().any(|x| x.matches_path(&path)) {
                        continue;
                    }
                    let Ok(meta) = std::fs::metadata(&path) else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    found.push((si, path, meta));
                }
            }
        }
        for (si, path, meta) in found {
            if let Some(f) = self.files.iter_mut().find(|f| f.dev == meta.dev() && f.ino == meta.ino()) {
                f.gone = None;
                continue;
            }
            match File::open(&path) {
                Ok(file) => self.files.push(Tracked {
                    source: si,
                    path,
                    file,
                    dev: meta.dev(),
                    ino: meta.ino(),
                    fp: None,
                    info: None,
                    read_pos: 0,
                    carry: Carry::default(),
                    size: meta.len(),
                    at_eof: false,
                    grew: now,
                    gone: None,
                }),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open a log file; trying again at the next scan")
                }
            }
        }
        for i in 0..self.files.len() {
            if self.files[i].info.is_none() {
                self.identify(i);
            } else {
                self.check_truncation(i);
            }
        }
        if !self.scanned {
            self.scanned = true;
            for m in std::mem::take(&mut self.restored) {
                if m.size > m.offset {
                    tracing::warn!(path = %m.path, lost_bytes = m.size - m.offset, "a log file was gone at start before it was all shipped");
                    if let Some(s) = self.sources.iter().find(|s| s.name == m.source) {
                        s.metrics.lost_bytes.inc_by(m.size - m.offset);
                    }
                }
            }
        }
        self.let_go(chunk, now);
        self.gauges();
    }

    /// Gives a new file (or a truncated one) its fingerprint and its starting offset.
    fn identify(&mut self, i: usize) {
        let f = &self.files[i];
        let Some(fp) = fingerprint(&f.file) else { return };
        let (dev, ino, size) = (f.dev, f.ino, f.size);
        let source_name = self.sources[f.source].name.clone();
        let same = |m: &Mark| m.fp == fp.hash && m.fp_len == fp.len;
        // The same file from the last run; else a copy of one (renamed across a restart, or
        // copied by copytruncate) read from where that one had got to.
        let start = if let Some(k) = self
            .restored
            .iter()
            .position(|m| same(m) && m.dev == dev && m.ino == ino)
            .or_else(|| self.restored.iter().position(|m| same(m) && m.source == source_name))
        {
            Some(self.restored.swap_remove(k).offset)
        } else if let Some(k) = self.truncations.iter().position(|(t, tino, ..)| *t == fp && *tino != ino) {
            // Not the truncated file itself: written again, its first line may be the same.
            Some(self.truncations.swap_remove(k).2)
        } else if let Some(j) =
            self.files.iter().position(|o| o.fp == Some(fp) && o.ino != ino && o.info.is_some())
        {
            // A copy of a file being read: the copy gives what the original had not yet
            // given, and the original skips what the copy holds (the same bytes).
            let o = &mut self.files[j];
            let from = o.consumed();
            if o.read_pos < size {
                o.read_pos = size;
                o.carry = Carry::default();
            }
            Some(from)
        } else if self.first_start && !self.scanned && self.read_from == ReadFrom::End {
            Some(size)
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        let f = &mut self.files[i];
        let start = start.unwrap_or(0).min(size);
        f.fp = Some(fp);
        f.read_pos = start;
        f.carry = Carry::default();
        let path = f.path.display().to_string();
        f.info = Some(Arc::new(FileInfo {
            id,
            path: path.clone(),
            key: format!("{:016x}{:x}{:x}", fp.hash, dev, ino),
        }));
        let mark =
            Mark { source: source_name, path, dev, ino, fp: fp.hash, fp_len: fp.len, offset: start, size };
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.marks.insert(id, mark);
        p.changed = true;
    }

    /// A file now smaller than where reading got, or whose first line changed, was truncated
    /// or overwritten: what it held and was not read is lost; it is read again from 0.
    fn check_truncation(&mut self, i: usize) {
        let f = &mut self.files[i];
        let Ok(meta) = f.file.metadata() else { return };
        let size = meta.len();
        let changed = size < f.read_pos
            || (f.fp.is_some() && fingerprint(&f.file).is_some_and(|fp| Some(fp) != f.fp))
            || (size < f.fp.map_or(0, |fp| u64::from(fp.len)));
        if !changed {
            f.size = size;
            return;
        }
        let lost = f.size.saturating_sub(f.consumed());
        let source = &self.sources[f.source];
        tracing::info!(path = %f.path.display(), lost_bytes = lost, "log file truncated: reading it again from the start");
        if lost > 0 {
            source.metrics.lost_bytes.inc_by(lost);
        }
        if let (Some(fp), Some(info)) = (f.fp, f.info.take()) {
            self.truncations.push((fp, f.ino, f.consumed(), Instant::now()));
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.marks.remove(&info.id);
            p.changed = true;
        }
        f.fp = None;
        f.read_pos = 0;
        f.carry = Carry::default();
        f.size = size;
        f.at_eof = false;
        self.identify(i);
    }

    /// Files gone from every glob (renamed away, deleted) and read to their end, with no
    /// growth for `rotate_wait`, are closed: their last line, even without a newline, is sent.
    fn let_go(&mut self, chunk: &mut Chunk, now: Instant) {
        let mut i = 0;
        while i < self.files.len() {
            let f = &self.files[i];
            let done =
                f.gone.is_some_and(|g| now.duration_since(g.max(f.grew)) >= self.rotate_wait) && f.at_eof;
            if !done {
                i += 1;
                continue;
            }
            let mut f = self.files.swap_remove(i);
            if let Some(info) = f.info.clone() {
                let source = &self.sources[f.source];
                let consumed = split_carry(&mut f, source, chunk, now_ns());
                let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                p.closing.insert(info.id, consumed);
                if p.marks.get(&info.id).is_some_and(|m| m.offset >= consumed) {
                    p.marks.remove(&info.id);
                    p.closing.remove(&info.id);
                }
                p.changed = true;
            }
            tracing::debug!(path = %f.path.display(), "log file rotated away and read to its end: closed");
        }
    }

    /// Reads what the files have into `chunk`, a turn each, until it is full or every file is
    /// at its end. Returns whether anything was read.
    pub fn read(&mut self, chunk: &mut Chunk) -> bool {
        let n = self.files.len();
        let mut any = false;
        let time = now_ns();
        for k in 0..n {
            if chunk.text.len() >= CHUNK_BYTES {
                break;
            }
            let i = (self.turn + k) % n;
            any |= self.read_one(i, chunk, time);
        }
        self.turn = self.turn.wrapping_add(1);
        // Multi-line events whose timeout passed with nothing after them.
        for f in &mut self.files {
            let source = &self.sources[f.source];
            let waited = f.carry.grew.is_some_and(|g| g.elapsed() >= source.shape.multiline_timeout);
            if f.info.is_some() && waited && f.carry.bytes.last() == Some(&b'\n') {
                split_carry(f, source, chunk, time);
                any = true;
            }
        }
        any
    }

    fn read_one(&mut self, i: usize, chunk: &mut Chunk, time: u64) -> bool {
        let f = &mut self.files[i];
        if f.info.is_none() {
            return false;
        }
        if f.at_eof {
            // Only look again when the file's size changed; growth from the end is only more
            // of the same file if its first line is still the one it had (copytruncate on a
            // busy file: truncated and longer again before this look).
            match f.file.metadata() {
                Ok(m) if m.len() > f.read_pos && fingerprint(&f.file) == f.fp => f.at_eof = false,
                Ok(m) if m.len() == f.read_pos => return false,
                Ok(_) => {
                    self.check_truncation(i);
                    return false;
                }
                Err(_) => return false,
            }
        }
        let f = &mut self.files[i];
        let info = f.info.clone().expect("checked above");
        let seg = chunk.text.len();
        let base = f.consumed();
        chunk.text.extend_from_slice(&f.carry.bytes);
        let start = chunk.text.len();
        chunk.text.resize(start + READ_BYTES, 0);
        let n = match f.file.read_at(&mut chunk.text[start..], f.read_pos) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(path = %f.path.display(), error = %e, "reading a log file failed; trying again");
                0
            }
        };
        chunk.text.truncate(start + n);
        if n == 0 {
            chunk.text.truncate(seg);
            f.at_eof = true;
            return false;
        }
        f.read_pos += n as u64;
        f.size = f.size.max(f.read_pos);
        f.grew = Instant::now();
        let source = &self.sources[f.source];
        let at = Segment { seg, base, time_ns: time, flush: false };
        let split = lines::split(chunk, at, &source.shape, &info, &mut f.carry);
        source.metrics.lines_read.inc_by(split.records);
        source.metrics.truncated.inc_by(split.truncated);
        chunk.ends.push((info.id, split.consumed));
        true
    }

    /// Sizes and gauges brought up to date without a scan: while reading waits for a sink,
    /// the lag it shows must still grow.
    pub fn refresh(&mut self) {
        for f in &mut self.files {
            if let Ok(m) = f.file.metadata() {
                f.size = f.size.max(m.len());
            }
        }
        self.gauges();
    }

    pub fn gauges(&self) {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        for (si, source) in self.sources.iter().enumerate() {
            let mine = self.files.iter().filter(|f| f.source == si);
            let (mut open, mut pending) = (0i64, 0u64);
            for f in mine {
                open += 1;
                let delivered = f.info.as_ref().and_then(|i| p.marks.get(&i.id)).map_or(0, |m| m.offset);
                pending += f.size.max(f.read_pos).saturating_sub(delivered);
            }
            source.metrics.files.set(open);
            source.metrics.pending_bytes.set(pending as i64);
        }
    }

    /// Updates each mark's `size` (what is lost if the file is gone at the next start).
    pub fn sizes_into(&self, progress: &mut Progress) {
        for f in &self.files {
            if let Some(m) = f.info.as_ref().and_then(|i| progress.marks.get_mut(&i.id)) {
                m.size = f.size.max(f.read_pos);
            }
        }
    }
}

/// The file's carried bytes (a pending event, an incomplete last line) made records now.
/// Returns the offset every byte before which is in a chunk.
fn split_carry(f: &mut Tracked, source: &Source, chunk: &mut Chunk, time_ns: u64) -> u64 {
    let Some(info) = f.info.clone() else { return f.consumed() };
    let at = Segment { seg: chunk.text.len(), base: f.consumed(), time_ns, flush: true };
    chunk.text.extend_from_slice(&f.carry.bytes);
    let split = lines::split(chunk, at, &source.shape, &info, &mut f.carry);
    source.metrics.lines_read.inc_by(split.records);
    source.metrics.truncated.inc_by(split.truncated);
    chunk.ends.push((info.id, split.consumed));
    split.consumed
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The checksum of the first line (newline included), or of the first 256 bytes if the first
/// line is longer; `None` while the first line is incomplete.
fn fingerprint(file: &File) -> Option<Fingerprint> {
    let mut buf = [0u8; FINGERPRINT_BYTES];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    let len = match memchr::memchr(b'\n', &buf[..n]) {
        Some(i) => i + 1,
        None if n == FINGERPRINT_BYTES => n,
        None => return None,
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, &buf[..len]);
    let hash = u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"));
    Some(Fingerprint { hash, len: len as u32 })
}
