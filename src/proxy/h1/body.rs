//! The app's response body, read from the connection as the client takes it: by length,
//! chunked (with trailers, strictly: CRLF line ends, hex sizes, nothing after a chunk's
//! data), or until the app closes. The connection comes back for reuse only when the
//! response ended exactly where its framing said, the whole request went out, and the app
//! keeps the connection open.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Frame, SizeHint};

use super::head::Framing;
use super::{Error, H1Conn, MAX_HEAD, Outgoing};

/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Trailer fields accepted after the last chunk.
const MAX_TRAILERS: usize = 64;

pub struct Body {
    conn: Option<H1Conn>,
    /// The request's body, still being written while the response streams (full duplex);
    /// boxed, as most requests have finished by now and the body is moved on every poll.
    out: Option<Box<Outgoing>>,
    request_whole: bool,
    state: State,
    keep_alive: bool,
    /// `conn` is kept after the end because the exchange ended cleanly and the app keeps
    /// the connection open.
    reusable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Close,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    More,
}

impl Body {
    pub(super) fn new(conn: H1Conn, out: Outgoing, framing: Framing, keep_alive: bool) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        let request_whole = out.done();
        let mut body = Body {
            conn: Some(conn),
            out: (!request_whole && !out.failed).then(|| Box::new(out)),
            request_whole,
            state,
            // `Head::keep_alive` is already false for close-delimited bodies.
            keep_alive,
            reusable: false,
        };
        if state == State::Done {
            body.finish();
        }
        body
    }

    /// The connection, when the response ended whole and it can carry another request.
    pub fn take_reusable(&mut self) -> Option<H1Conn> {
        if !self.reusable {
            return None;
        }
        self.reusable = false;
        self.conn.take()
    }

    fn finish(&mut self) {
        self.state = State::Done;
        // Bytes after the end of the response were not asked for: the connection is out of
        // step with the app, so it closes.
        let clean = self.conn.as_ref().is_some_and(|c| c.rbuf.is_empty());
        self.reusable = clean && self.keep_alive && self.request_whole;
        if !self.reusable {
            self.conn = None;
        }
        self.out = None;
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.state = State::Done;
        self.conn = None;
        self.out = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            if this.state == State::Done {
                return Poll::Ready(None);
            }
            let Some(conn) = &mut this.conn else { return Poll::Ready(None) };
            if let Some(out) = &mut this.out {
                match out.poll_write(cx, &mut conn.io) {
                    Poll::Ready(Ok(())) => {
                        this.out = None;
                        this.request_whole = true;
                    }
                    // The app stopped reading the request; its answer still comes whole,
                    // but the connection is not reused.
                    Poll::Ready(Err(_)) => this.out = None,
                    Poll::Pending => {}
                }
            }
            let step = match decode(&mut this.state, &mut conn.rbuf) {
                Ok(step) => step,
                Err(e) => return this.fail(e),
            };
            let frame = match step {
                Step::Data(data) => Frame::data(data),
                Step::Trailers(t) => Frame::trailers(t),
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::More => match ready!(conn.poll_fill(cx)) {
                    Ok(0) if this.state == State::Close => {
                        this.keep_alive = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => return this.fail(Error::Incomplete),
                    Ok(_) => continue,
                    Err(e) => return this.fail(e.into()),
                },
            };
            // hyper stops polling once a body says it has ended, so the end is handled now.
            if this.state == State::Done {
                this.finish();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The next thing the buffered bytes hold, advancing `state`.
fn decode(state: &mut State, buf: &mut BytesMut) -> Result<Step, Error> {
    loop {
        match *state {
            State::Done => return Ok(Step::End),
            State::Length(_) | State::ChunkData(_) | State::Close if buf.is_empty() => return Ok(Step::More),
            State::Close => return Ok(Step::Data(buf.split().freeze())),
            State::Length(left) | State::ChunkData(left) => {
                let n = left.min(buf.len() as u64);
                let data = buf.split_to(n as usize).freeze();
                *state = match (*state, left - n) {
                    (State::Length(_), 0) => State::Done,
                    (State::Length(_), rest) => State::Length(rest),
                    (_, 0) => State::ChunkEnd,
                    (_, rest) => State::ChunkData(rest),
                };
                return Ok(Step::Data(data));
            }
            State::ChunkSize => {
                let Some(lf) = memchr::memchr(b'\n', buf) else {
                    return if buf.len() > MAX_CHUNK_LINE {
                        Err(Error::Chunk("size line too long"))
                    } else {
                        Ok(Step::More)
                    };
                };
                if lf == 0 || buf[lf - 1] != b'\r' {
                    return Err(Error::Chunk("bare LF"));
                }
                let size = chunk_size(&buf[..lf - 1])?;
                buf.advance(lf + 1);
                *state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
            }
            State::ChunkEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Chunk("data longer than its size"));
                }
                buf.advance(2);
                *state = State::ChunkSize;
            }
            State::Trailers => return trailers(state, buf),
        }
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]`; extensions are ignored, as RFC 9112 allows.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(Error::Chunk("bad size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' || rest.iter().any(|&b| b < b' ' && b != b'\t' || b == 0x7f) {
        return Err(Error::Chunk("bad size line"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| n << 4 | u64::from((d as char).to_digit(16).unwrap_or(0))))
}

/// The trailer section after the last chunk, ending with an empty line.
fn trailers(state: &mut State, buf: &mut BytesMut) -> Result<Step, Error> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        *state = State::Done;
        return Ok(Step::End);
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(Step::More),
        _ => return Err(Error::Chunk("bad trailers")),
    };
    if memchr::memchr_iter(b'\n', &buf[..len]).any(|i| i == 0 || buf[i - 1] != b'\r') {
        return Err(Error::Chunk("bare LF in trailers"));
    }
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Error::Chunk("bad trailer name"))?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| Error::Chunk("bad trailer value"))?;
        map.append(name, value);
    }
    buf.advance(len);
    *state = State::Done;
    Ok(Step::Trailers(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `raw` fed in pieces of `step` bytes; returns the data and the trailers.
    fn decode_all(
        start: State,
        raw: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>, usize), Error> {
        let mut state = start;
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match decode(&mut state, &mut buf)? {
                Step::Data(d) => data.extend_from_slice(&d),
                Step::Trailers(t) => trailers = Some(t),
                Step::End => return Ok((data, trailers, buf.len())),
                Step::More if fed < raw.len() => {
                    let n = step.min(raw.len() - fed);
                    buf.extend_from_slice(&raw[fed..fed + n]);
                    fed += n;
                }
                Step::More => return Err(Error::Incomplete),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n";
        for step in [1, 2, 3, 7, raw.len()] {
            let (data, trailers, rest) = decode_all(State::ChunkSize, raw, step).unwrap();
            assert_eq!(data, b"hello world", "step {step}");
            assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
            assert_eq!(rest, 0);
        }
        let (data, trailers, _) = decode_all(State::ChunkSize, b"A\r\n0123456789\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!((data.len(), trailers.is_none()), (10, true));
    }

    #[test]
    fn bad_chunking_is_an_error_not_a_guess() {
        for raw in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello!\r\n0\r\n\r\n",
            b"x\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffff1\r\n",
            b"5 garbage\r\nhello\r\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                decode_all(State::ChunkSize, raw, 3).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn lengths_stop_exactly_and_leave_the_rest() {
        let (data, _, rest) = decode_all(State::Length(5), b"helloEXTRA", 3).unwrap();
        assert_eq!((data.as_slice(), rest), (&b"hello"[..], 1));
        assert!(matches!(decode_all(State::Length(5), b"hel", 3), Err(Error::Incomplete)));
    }
}
