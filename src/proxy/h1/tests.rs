//! The lean client against raw sockets that answer exactly the bytes a test gives, so every
//! framing and every way an app can misbehave is reproduced to the byte.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::proxy::pool::{EndpointKey, Pool, Proto};

const TIMEOUT: Duration = Duration::from_secs(1);

/// A server that, on each connection, reads a request head and answers with the next of
/// `answers`; a `None` after an answer closes the connection right after it.
async fn raw_server(
    answers: Vec<Option<&'static [u8]>>,
) -> (Arc<Endpoint>, tokio::task::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut heads = Vec::new();
        let (mut s, _) = listener.accept().await.unwrap();
        let mut answers = answers.into_iter().peekable();
        while let Some(answer) = answers.next() {
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap() == 0 {
                    return heads;
                }
                got.push(b[0]);
            }
            heads.push(String::from_utf8(got).unwrap());
            let Some(bytes) = answer else { return heads };
            s.write_all(bytes).await.unwrap();
            // A `None` next: close right after this answer.
            if answers.peek().is_some_and(Option::is_none) {
                return heads;
            }
        }
        heads
    });
    let ep = Pool::new().endpoint(EndpointKey { addr: addr.into(), tls: None, proto: Proto::Http1 });
    (ep, task)
}

fn request(method: &str) -> Request<RequestBody> {
    Request::builder().method(method).uri("/p?q").header("host", "app").body(RequestBody::empty()).unwrap()
}

/// Status, body text, trailers' `grpc-status`, and the connection if reusable.
async fn exchange(
    ep: &Arc<Endpoint>,
    method: &str,
    conn: Option<H1Conn>,
) -> (u16, String, Option<String>, Option<H1Conn>) {
    let resp = ep.send_h1(request(method), conn, TIMEOUT).await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let (mut data, mut trailer) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(t) = frame.trailers_ref() {
            trailer = t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        }
        if let Ok(d) = frame.into_data() {
            data.extend_from_slice(&d);
        }
    }
    (status, String::from_utf8(data).unwrap(), trailer, body.take_reusable())
}

#[tokio::test]
async fn keep_alive_responses_of_every_framing_reuse_one_connection() {
    let (ep, server) = raw_server(vec![
        Some(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
        Some(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n"),
        Some(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n"),
        Some(b"HTTP/1.1 204 No Content\r\n\r\n"),
        Some(b"HTTP/1.1 200 OK\r\n\r\nuntil close"),
    ])
    .await;
    let (s, body, _, conn) = exchange(&ep, "GET", None).await;
    assert_eq!((s, body.as_str()), (200, "hello"));
    let (s, body, trailer, conn) = exchange(&ep, "GET", conn).await;
    assert_eq!((s, body.as_str(), trailer.as_deref()), (201, "abc", Some("0")));
    let (s, body, _, conn) = exchange(&ep, "HEAD", conn).await;
    assert_eq!((s, body.as_str()), (200, ""));
    let (s, _, _, conn) = exchange(&ep, "DELETE", conn).await;
    assert_eq!(s, 204);
    let (s, body, _, conn) = exchange(&ep, "GET", conn).await;
    assert_eq!((s, body.as_str()), (200, "until close"));
    assert!(conn.is_none(), "a close-delimited response ends its connection");
    let heads = server.await.unwrap();
    assert_eq!(heads.len(), 5, "all on one connection");
    assert_eq!(heads[0], "GET /p?q HTTP/1.1\r\nhost: app\r\n\r\n");
    assert!(heads[2].starts_with("HEAD "));
}

#[tokio::test]
async fn bytes_after_a_response_or_connection_close_end_the_connection() {
    let (ep, _server) = raw_server(vec![Some(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokJUNK")]).await;
    assert!(exchange(&ep, "GET", None).await.3.is_none());
    let (ep, _server) =
        raw_server(vec![Some(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")]).await;
    assert!(exchange(&ep, "GET", None).await.3.is_none());
}

#[tokio::test]
async fn a_connection_the_app_closed_while_idle_is_not_used_again() {
    // A server that closes right after its answer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
        }
    });
    let ep = Pool::new().endpoint(EndpointKey { addr: addr.into(), tls: None, proto: Proto::Http1 });
    let (_, _, _, conn) = exchange(&ep, "GET", None).await;
    let conn = conn.expect("keep-alive by its headers");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!conn.is_usable(), "the app closed it while idle");
    // Handed back as the caller's own: skipped, and the request goes on a fresh one.
    let (s, body, _, _) = exchange(&ep, "GET", Some(conn)).await;
    assert_eq!((s, body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn broken_responses_are_errors_with_their_kind() {
    for (answer, kind) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            "app_invalid_response",
        ),
        (b"NOT HTTP\r\n\r\n", "app_invalid_response"),
        (b"HTTP/1.1 200 OK\r\ncontent", "app_reset"),
    ] {
        let (ep, _server) = raw_server(vec![Some(answer), None]).await;
        let err = ep.send_h1(request("GET"), None, TIMEOUT).await.err().expect("an error");
        assert_eq!(err.kind(), kind, "{answer:?}: {err}");
        assert!(!err.is_retryable(), "the request was sent");
    }
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_counts_as_incomplete() {
    let (ep, _server) =
        raw_server(vec![Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"), None]).await;
    let resp = ep.send_h1(request("GET"), None, TIMEOUT).await.unwrap();
    let mut body = resp.into_body();
    let mut saw_error = false;
    while let Some(frame) = body.frame().await {
        saw_error |= frame.is_err();
    }
    assert!(saw_error);
    assert!(body.take_reusable().is_none());
}

#[test]
fn chunk_sizes_are_written_in_hex() {
    for (n, hex) in [(0, "0"), (1, "1"), (15, "f"), (16, "10"), (16384, "4000"), (1 << 20, "100000")] {
        let mut buf = BytesMut::new();
        put_hex(&mut buf, n);
        assert_eq!(&buf[..], hex.as_bytes());
    }
}
