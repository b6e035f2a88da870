//! HTTP/1.1 message heads for the app-side client: the request head written, the response
//! head parsed (httparse) and its body framing decided by RFC 9112 §6.3, strictly: what a
//! front-end proxy reads differently from the app is how responses get smuggled.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};

use super::Error;

/// Headers a response head may carry (hyper's server default, 100, is for requests; apps
/// behind a sidecar send far fewer).
const MAX_HEADERS: usize = 128;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304, `Content-Length: 0`).
    Empty,
    Length(u64),
    Chunked,
    /// Until the app closes the connection (no length, no chunking).
    Close,
}

/// Writes the request head; returns whether the body goes chunked. The target is already in
/// origin form and hop-by-hop headers (`Transfer-Encoding` included) are gone: the framing is
/// ours to choose. A body of unknown length (an HTTP/2 client's, or a chunked one) is
/// chunked; a known one keeps the client's `Content-Length`, which hyper checked on the way in.
pub fn encode_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body_empty: bool,
    buf: &mut BytesMut,
) -> bool {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let size = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>();
    buf.reserve(method.as_str().len() + target.len() + size + 64);
    buf.put_slice(method.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        buf.put_slice(name.as_str().as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
    let has_length = headers.contains_key(CONTENT_LENGTH);
    let chunked = !body_empty && !has_length;
    if chunked {
        buf.put_slice(b"transfer-encoding: chunked\r\n");
    } else if body_empty && !has_length && matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        // A POST without either framing header is refused by strict servers (nginx: 411).
        buf.put_slice(b"content-length: 0\r\n");
    }
    buf.put_slice(b"\r\n");
    chunked
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The app lets the connection carry another request after this one.
    pub keep_alive: bool,
}

/// Parses a final response head from the front of `buf`, skipping interim (1xx) ones, and
/// removes what it used. `Ok(None)`: more bytes are needed.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    max_head: usize,
) -> Result<Option<Head>, Error> {
    loop {
        let Some(head) = parse_one(buf, head_request, max_head)? else { return Ok(None) };
        match head.status.as_u16() {
            // 100 Continue (we answer `Expect` on the client's hop), 102, 103 Early Hints:
            // the client gets the final response only.
            100 | 102..=199 => continue,
            // Nothing here asked to switch protocols (upgrades take their own connection).
            101 => return Err(Error::Response("101 without an upgrade request")),
            _ => return Ok(Some(head)),
        }
    }
}

fn parse_one(buf: &mut BytesMut, head_request: bool, max_head: usize) -> Result<Option<Head>, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut slots);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(Error::Response("head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Response("too many headers")),
        Err(_) => return Err(Error::Response("malformed head")),
    };
    if len > max_head {
        return Err(Error::Response("head too large"));
    }
    // httparse takes a bare LF as a line end; a proxy that did while another hop did not
    // would be a response-splitting vector, so the head must use CRLF throughout.
    if memchr::memchr_iter(b'\n', &buf[..len]).any(|i| i == 0 || buf[i - 1] != b'\r') {
        return Err(Error::Response("bare LF in head"));
    }
    let status = StatusCode::from_u16(res.code.unwrap_or(0)).map_err(|_| Error::Response("bad status"))?;
    let version = if res.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    // Header values are slices of the head's own bytes, shared, not copied.
    let base = buf.as_ptr() as usize;
    let mut spans = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| Error::Response("bad header name"))?;
        spans.push((name, h.value.as_ptr() as usize - base, h.value.len()));
    }
    let mut headers = HeaderMap::with_capacity(spans.len());
    let bytes: Bytes = buf.split_to(len).freeze();
    for (name, at, n) in spans {
        let value = HeaderValue::from_maybe_shared(bytes.slice(at..at + n))
            .map_err(|_| Error::Response("bad header value"))?;
        headers.append(name, value);
    }
    let framing = framing(&headers, status, head_request)?;
    let keep_alive =
        version == Version::HTTP_11 && framing != Framing::Close && !has_token(&headers, CONNECTION, "close");
    Ok(Some(Head { status, version, headers, framing, keep_alive }))
}

/// RFC 9112 §6.3, in its order. Both `Transfer-Encoding` and `Content-Length`, differing
/// lengths, or a coding other than chunked are refused, never guessed at.
fn framing(headers: &HeaderMap, status: StatusCode, head_request: bool) -> Result<Framing, Error> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    let has_te = headers.contains_key(TRANSFER_ENCODING);
    let length = content_length(headers)?;
    if has_te {
        if length.is_some() {
            return Err(Error::Response("both Transfer-Encoding and Content-Length"));
        }
        let mut codings = headers.get_all(TRANSFER_ENCODING).iter().flat_map(|v| tokens(v.as_bytes()));
        let only_chunked =
            codings.next().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) && codings.next().is_none();
        return if only_chunked {
            Ok(Framing::Chunked)
        } else {
            Err(Error::Response("unsupported transfer coding"))
        };
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// Every `Content-Length` value (repeated headers and comma lists alike) must be the same
/// number of decimal digits.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut found = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for t in tokens(value.as_bytes()) {
            let n = parse_decimal(t).ok_or(Error::Response("bad Content-Length"))?;
            if found.is_some_and(|f| f != n) {
                return Err(Error::Response("differing Content-Length values"));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn parse_decimal(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(t.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Comma-separated list elements, trimmed of optional whitespace; empty ones skipped.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(token.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, head_request: bool) -> Result<Option<Head>, Error> {
        parse_response(&mut BytesMut::from(raw), head_request, 64 * 1024)
    }

    fn framing_of(raw: &str) -> Result<Framing, Error> {
        parse(raw, false).map(|h| h.unwrap().framing)
    }

    #[test]
    fn request_heads_choose_their_framing() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("app"));
        let uri: Uri = "/a?b".parse().unwrap();
        let mut buf = BytesMut::new();
        assert!(!encode_request(&Method::GET, &uri, &h, true, &mut buf));
        assert_eq!(&buf[..], b"GET /a?b HTTP/1.1\r\nhost: app\r\n\r\n");
        buf.clear();
        assert!(encode_request(&Method::POST, &uri, &h, false, &mut buf));
        assert!(buf.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        buf.clear();
        assert!(!encode_request(&Method::POST, &uri, &h, true, &mut buf));
        assert!(buf.ends_with(b"content-length: 0\r\n\r\n"));
        h.insert("content-length", HeaderValue::from_static("5"));
        buf.clear();
        assert!(!encode_request(&Method::PUT, &uri, &h, false, &mut buf));
        assert!(buf.ends_with(b"content-length: 5\r\n\r\n"));
    }

    #[test]
    fn responses_are_framed_as_rfc_9112_says() {
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n").unwrap(), Framing::Length(12));
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\ncontent-length: 3\r\n\r\n").unwrap(),
            Framing::Length(3)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n").unwrap(),
            Framing::Chunked
        );
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\n\r\n").unwrap(), Framing::Close);
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\ncontent-length: 10\r\n\r\n").unwrap(),
            Framing::Empty
        );
        assert_eq!(framing_of("HTTP/1.1 304 Not Modified\r\n\r\n").unwrap(), Framing::Empty);
        let head = parse("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert!(head.keep_alive);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\n",
            "HTTP/1.1 200 OK\ncontent-length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(parse(raw, false).is_err(), "{raw:?} was accepted");
        }
    }

    #[test]
    fn interim_responses_are_skipped_and_the_rest_stays_buffered() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
        );
        let head = parse_response(&mut buf, false, 1024).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert!(!head.keep_alive);
        assert_eq!(head.headers.get("content-length").unwrap(), "2");
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_fail() {
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-le", false).unwrap().is_none());
        let big = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(100));
        assert!(parse_response(&mut BytesMut::from(big.as_str()), false, 64).is_err());
        let http10 = parse("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false).unwrap().unwrap();
        assert!(!http10.keep_alive);
    }
}
