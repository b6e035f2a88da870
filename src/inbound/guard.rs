//! A strict HTTP/1.1 framing check in front of hyper's parser, against request smuggling.
//!
//! hyper is lenient where RFC 9112 lets a recipient be: it accepts a bare LF as a line end
//! and, given both `Content-Length` and `Transfer-Encoding`, silently drops the length. A
//! proxy that tolerates what the app behind it reads differently is how requests are
//! smuggled, so this guard reads the same bytes first and refuses:
//! - a bare LF where CRLF is required (request line, headers, chunk lines, trailers),
//! - obs-fold (a header line starting with a space or tab),
//! - `Content-Length` together with `Transfer-Encoding`, differing or malformed lengths,
//!   a `Transfer-Encoding` whose last coding is not `chunked`, `Transfer-Encoding` on HTTP/1.0,
//! - a malformed chunk size or chunk not followed by CRLF.
//!
//! On a violation the bytes from the offending line on are replaced by a line hyper cannot
//! parse, so hyper itself answers 400 and closes the connection, after any earlier
//! pipelined responses and before anything of the bad request reaches the app. The guard
//! also tells the connection when a request head is being read, for the header timeout.
//! It does not parse anything hyper needs: it only tracks where messages begin and end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// What hyper is fed instead of a refused request: `\x01` is not a valid token, so it fails
/// as a method, a header name or a chunk size alike, and hyper answers 400.
pub const POISON: &[u8] = b"\x01\r\n\r\n";

/// Longest line prefix kept for inspection. Header names and the values we read
/// (lengths, codings) are short; a longer `Content-Length` or `Transfer-Encoding` line is
/// refused. Other long lines are scanned, not stored.
const KEPT: usize = 256;

/// Per-connection state shared between the IO wrapper, the service and the supervisor.
#[derive(Debug)]
pub struct ConnState {
    /// Bumped on every read and write: the idle timer compares snapshots.
    pub activity: AtomicU64,
    /// Requests waiting for their response head (bounded by `request_timeout`, not by the
    /// idle timeout); a response that streams counts as activity instead.
    pub awaiting_head: AtomicUsize,
    /// Milliseconds since `epoch` + 1 when a request head began and is not yet complete;
    /// 0 when no head is being read.
    pub head_started: AtomicU64,
    /// The guard refused a request on this connection.
    pub refused: AtomicBool,
    /// The app accepted a protocol switch (101); the bytes after it are not HTTP.
    pub upgraded: AtomicBool,
    pub epoch: Instant,
}

impl ConnState {
    pub fn new() -> Arc<Self> {
        let s = ConnState {
            activity: AtomicU64::new(0),
            awaiting_head: AtomicUsize::new(0),
            head_started: AtomicU64::new(1),
            refused: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            epoch: Instant::now(),
        };
        Arc::new(s)
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head, line by line.
    Head,
    /// A fixed-length body: bytes left.
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkCr,
    ChunkLf,
    Trailer,
    /// After an upgrade or CONNECT request: opaque if the app said 101, else a new head.
    AwaitUpgrade,
    Passthrough,
}

#[derive(Debug, Default)]
struct HeadInfo {
    request_line_seen: bool,
    http10: bool,
    connect: bool,
    upgrade: bool,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked_last: bool,
}

/// A refusal: deliver `at` bytes of the current read, then the poison.
#[derive(Debug, PartialEq, Eq)]
pub struct Violation {
    pub at: usize,
    pub what: &'static str,
}

pub struct Guard {
    state: State,
    head: HeadInfo,
    /// The current line's first `KEPT` bytes.
    line: Vec<u8>,
    /// Total length of the current line so far (may exceed `line.len()`).
    line_len: usize,
    /// The current line's last byte, which a long line's kept prefix lacks.
    last: u8,
    conn: Arc<ConnState>,
}

impl Guard {
    pub fn new(conn: Arc<ConnState>) -> Self {
        Guard {
            state: State::Head,
            head: HeadInfo::default(),
            line: Vec::with_capacity(KEPT),
            line_len: 0,
            last: 0,
            conn,
        }
    }

    /// Checks `buf`, the next bytes from the client.
    ///
    /// A refused request is withheld whole when it began in `buf` (hyper then never
    /// dispatches it, so not even its head reaches the app); when it began in an earlier
    /// read, from the refused line or byte on.
    pub fn scan(&mut self, buf: &[u8]) -> Result<(), Violation> {
        let mut i = 0;
        let mut message_start = None;
        while i < buf.len() {
            match self.state {
                State::Passthrough => return Ok(()),
                State::AwaitUpgrade => {
                    self.state = if self.conn.upgraded.load(Ordering::Acquire) {
                        State::Passthrough
                    } else {
                        State::Head
                    };
                }
                State::Body(n) => {
                    let take = n.min((buf.len() - i) as u64);
                    i += take as usize;
                    self.state = if n == take { State::Head } else { State::Body(n - take) };
                }
                State::ChunkData(n) => {
                    let take = n.min((buf.len() - i) as u64);
                    i += take as usize;
                    self.state = if n == take { State::ChunkCr } else { State::ChunkData(n - take) };
                }
                State::ChunkCr | State::ChunkLf => {
                    let want = if self.state == State::ChunkCr { b'\r' } else { b'\n' };
                    if buf[i] != want {
                        return Err(Violation {
                            at: message_start.unwrap_or(i),
                            what: "chunk data not followed by CRLF",
                        });
                    }
                    i += 1;
                    self.state = if self.state == State::ChunkCr { State::ChunkLf } else { State::ChunkSize };
                }
                State::Head | State::ChunkSize | State::Trailer => {
                    let line_start = if self.line_len == 0 { i } else { 0 };
                    if self.state == State::Head && self.line_len == 0 && !self.head.request_line_seen {
                        message_start = Some(i);
                        // First byte of a new request head: the header timer starts.
                        let _ = self.conn.head_started.compare_exchange(
                            0,
                            self.conn.now_ms(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    let rest = &buf[i..];
                    match memchr::memchr(b'\n', rest) {
                        None => {
                            self.push(rest);
                            i = buf.len();
                        }
                        Some(p) => {
                            i += p + 1;
                            let result = if self.line_len == 0 && p <= KEPT {
                                // The whole line is in this read (the usual case): checked in
                                // place, without copying it.
                                self.last = if p > 0 { rest[p - 1] } else { 0 };
                                let r = self.line_done(&rest[..p], false);
                                self.last = 0;
                                r
                            } else {
                                self.push(&rest[..p]);
                                self.end_line()
                            };
                            if let Err(what) = result {
                                let at = message_start.unwrap_or(line_start);
                                return Err(Violation { at, what });
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = KEPT.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.line_len += bytes.len();
        if let Some(&b) = bytes.last() {
            self.last = b;
        }
    }

    /// A complete line (without its LF) is in `self.line`.
    fn end_line(&mut self) -> Result<(), &'static str> {
        let truncated = self.line_len > self.line.len();
        let line = std::mem::take(&mut self.line);
        let result = self.line_done(&line, truncated);
        self.line_len = 0;
        self.last = 0;
        self.line = line;
        self.line.clear();
        result
    }

    fn line_done(&mut self, line: &[u8], truncated: bool) -> Result<(), &'static str> {
        if self.last != b'\r' {
            return Err("bare LF where CRLF is required");
        }
        // A long line's kept prefix lacks its end (and its CR); callers that read a value
        // refuse truncated lines.
        let content = if truncated { line } else { &line[..line.len() - 1] };
        match self.state {
            State::Head => self.head_line(content, truncated),
            State::ChunkSize => {
                if truncated {
                    return Err("chunk size line too long");
                }
                let size = parse_chunk_size(content).ok_or("malformed chunk size")?;
                self.state = if size == 0 { State::Trailer } else { State::ChunkData(size) };
                Ok(())
            }
            State::Trailer => {
                if content.is_empty() {
                    self.state = State::Head;
                    Ok(())
                } else if content[0] == b' ' || content[0] == b'\t' {
                    Err("obs-fold in trailer")
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    fn head_line(&mut self, content: &[u8], truncated: bool) -> Result<(), &'static str> {
        if content.is_empty() {
            if !self.head.request_line_seen {
                // RFC 9112 §2.2: an empty line before the request line may be ignored.
                return Ok(());
            }
            return self.head_done();
        }
        if !self.head.request_line_seen {
            self.head.request_line_seen = true;
            self.head.connect = content.starts_with(b"CONNECT ");
            self.head.http10 = content.ends_with(b"HTTP/1.0");
            return Ok(());
        }
        if content[0] == b' ' || content[0] == b'\t' {
            return Err("obs-fold (a header line starting with whitespace)");
        }
        let Some(colon) = content.iter().position(|&b| b == b':') else {
            // hyper refuses it too; leave the 400 to hyper.
            return Ok(());
        };
        let name = &content[..colon];
        let value = trim(&content[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            if truncated {
                return Err("Content-Length line too long");
            }
            for part in value.split(|&b| b == b',') {
                let n = parse_decimal(trim(part)).ok_or("malformed Content-Length")?;
                match self.head.content_length {
                    Some(prev) if prev != n => return Err("differing Content-Length values"),
                    _ => self.head.content_length = Some(n),
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if truncated {
                return Err("Transfer-Encoding line too long");
            }
            self.head.transfer_encoding = true;
            if let Some(last) = value.split(|&b| b == b',').map(trim).rfind(|c| !c.is_empty()) {
                self.head.chunked_last = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.head.upgrade = true;
        }
        Ok(())
    }

    fn head_done(&mut self) -> Result<(), &'static str> {
        let head = std::mem::take(&mut self.head);
        self.conn.head_started.store(0, Ordering::Relaxed);
        if head.transfer_encoding {
            if head.content_length.is_some() {
                return Err("both Content-Length and Transfer-Encoding");
            }
            if head.http10 {
                return Err("Transfer-Encoding in an HTTP/1.0 request");
            }
            if !head.chunked_last {
                return Err("Transfer-Encoding does not end in chunked");
            }
            self.state = State::ChunkSize;
        } else {
            self.state = match head.content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            };
        }
        if head.upgrade || head.connect {
            // Bodies of upgrade requests are not a thing WebSocket clients send; hyper
            // itself stops reading until it knows whether the app switched protocols.
            self.state = State::AwaitUpgrade;
        }
        Ok(())
    }
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if *first == b' ' || *first == b'\t' {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if *last == b' ' || *last == b'\t' {
            b = rest;
        } else {
            break;
        }
    }
    b
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// `chunk-size [ chunk-ext ]` (RFC 9112 §7.1): hex digits, then optional whitespace and
/// extensions after `;`.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = trim(&line[digits..]);
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b < 0x20 && b != b'\t') {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(ConnState::new())
    }

    fn check(input: &[u8]) -> Result<(), Violation> {
        guard().scan(input)
    }

    #[test]
    fn clean_requests_pass_in_any_split() {
        let input: &[u8] =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(check(input), Ok(()));
        for split in 1..input.len() {
            let mut g = guard();
            assert_eq!(g.scan(&input[..split]), Ok(()), "split {split}");
            assert_eq!(g.scan(&input[split..]), Ok(()), "split {split}");
            assert_eq!(g.state, State::Head);
        }
    }

    #[test]
    fn smuggling_shapes_are_refused_at_their_line() {
        let cases: &[(&[u8], &str)] = &[
            (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", "differing"),
            (b"POST / HTTP/1.1\r\nContent-Length: 4, 5\r\n\r\n", "differing"),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "malformed"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", "obs-fold"),
            (b"GET / HTTP/1.1\nHost: x\r\n\r\n", "bare LF"),
            (b"GET / HTTP/1.1\r\nHost: x\n\r\n", "bare LF"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "does not end in chunked"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n", "bare LF"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX", "CRLF"),
        ];
        for (input, what) in cases {
            let v = check(input).expect_err(std::str::from_utf8(input).unwrap());
            assert!(v.what.contains(what), "{:?}: {}", std::str::from_utf8(input), v.what);
        }
    }

    #[test]
    fn long_lines_read_the_same_whole_or_split() {
        let long_value = "v".repeat(3 * KEPT);
        let fine = format!("GET / HTTP/1.1\r\nX-Long: {long_value}\r\n\r\n");
        let bad = format!("POST / HTTP/1.1\r\nContent-Length: {}5\r\n\r\n", "0".repeat(2 * KEPT));
        for split in [1, 20, KEPT, fine.len() - 3] {
            let mut g = guard();
            assert_eq!(g.scan(&fine.as_bytes()[..split]), Ok(()));
            assert_eq!(g.scan(&fine.as_bytes()[split..]), Ok(()), "split {split}");
        }
        assert_eq!(check(fine.as_bytes()), Ok(()));
        assert!(check(bad.as_bytes()).unwrap_err().what.contains("too long"));
        let mut g = guard();
        g.scan(&bad.as_bytes()[..40]).unwrap();
        assert!(g.scan(&bad.as_bytes()[40..]).unwrap_err().what.contains("too long"));
    }

    #[test]
    fn refused_request_is_withheld_from_its_start() {
        let first = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut input = first.to_vec();
        input.extend_from_slice(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        // hyper gets the first request whole, and none of the second.
        assert_eq!(check(&input).unwrap_err().at, first.len());
        // Split across reads: what was delivered stays delivered; the rest is cut at the
        // refused line.
        let mut g = guard();
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        g.scan(head).unwrap();
        assert_eq!(g.scan(b"5\r\nhello\r\nzz\r\n").unwrap_err().at, 10);
    }

    #[test]
    fn header_timer_marks_heads() {
        let conn = ConnState::new();
        let mut g = Guard::new(conn.clone());
        g.scan(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(conn.head_started.load(Ordering::Relaxed), 0);
        g.scan(b"GET / HT").unwrap();
        assert_ne!(conn.head_started.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn upgrade_becomes_opaque_only_after_101() {
        let conn = ConnState::new();
        let mut g = Guard::new(conn.clone());
        g.scan(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        conn.upgraded.store(true, Ordering::Release);
        assert_eq!(g.scan(b"\x81\x85 binary \n frames"), Ok(()));
        let mut g = Guard::new(ConnState::new());
        g.scan(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(g.scan(b"GET / HTTP/1.1\nHost: x\r\n\r\n").is_err());
    }
}
