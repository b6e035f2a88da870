//! The pool against a real HTTP/1.1 server on loopback (hyper's), counting the connections
//! it accepts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::*;
use crate::proxy::body::RequestBody;

const TIMEOUT: Duration = Duration::from_secs(1);

/// A server answering `ok` after `delay`; returns its address and the connections accepted.
async fn server(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

fn endpoint(addr: SocketAddr) -> Arc<Endpoint> {
    Pool::new().endpoint(EndpointKey { addr: addr.into(), tls: None, proto: Proto::Http1 })
}

/// A GET with an empty body, as `RequestBody` needs an `Incoming`: made by a loopback hop.
fn get() -> Request<RequestBody> {
    Request::get("/").header("host", "test").body(RequestBody::empty()).unwrap()
}

/// The response body read whole, and the connection when it can be reused.
async fn fetch(ep: &Arc<Endpoint>, preferred: Option<H1Conn>) -> (String, Option<H1Conn>) {
    let resp = ep.send_h1(get(), preferred, TIMEOUT).await.unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        got.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    (String::from_utf8_lossy(&got).into_owned(), body.take_reusable())
}

fn release(conn: Option<H1Conn>) {
    conn.expect("reusable").return_to_pool();
}

#[tokio::test]
async fn a_connection_returned_whole_is_reused() {
    let (addr, accepted) = server(Duration::ZERO).await;
    let ep = endpoint(addr);
    for _ in 0..3 {
        let (body, conn) = fetch(&ep, None).await;
        assert_eq!(body, "ok");
        release(conn);
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 1);
    assert_eq!(ep.idle_connections(), 1);
}

#[tokio::test]
async fn a_connection_whose_response_broke_off_is_not_reused() {
    let (addr, accepted) = server(Duration::ZERO).await;
    let ep = endpoint(addr);
    // The response is dropped before its body was read: the connection goes with it.
    drop(ep.send_h1(get(), None, TIMEOUT).await.unwrap());
    let (_, conn) = fetch(&ep, None).await;
    release(conn);
    assert_eq!(accepted.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn the_callers_own_connection_is_preferred() {
    let (addr, accepted) = server(Duration::ZERO).await;
    let ep = endpoint(addr);
    let (_, mine) = fetch(&ep, None).await;
    let (_, second) = fetch(&ep, mine).await;
    assert!(second.is_some());
    assert_eq!(accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_burst_never_dials_more_than_the_cap_at_once_and_every_request_is_answered() {
    let (addr, accepted) = server(Duration::from_millis(50)).await;
    let ep = endpoint(addr);
    let requests = (0..3 * MAX_DIALS).map(|_| {
        let ep = ep.clone();
        tokio::spawn(async move {
            let (body, conn) = fetch(&ep, None).await;
            release(conn);
            body
        })
    });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.unwrap(), "ok");
    }
    assert!(ep.open_connections() <= MAX_CONNECTIONS);
    assert!(accepted.load(Ordering::Relaxed) <= 3 * MAX_DIALS);
    assert_eq!(ep.dialing.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn the_reaper_closes_stale_idle_connections() {
    let (addr, _) = server(Duration::ZERO).await;
    let ep = endpoint(addr);
    let (_, conn) = fetch(&ep, None).await;
    release(conn);
    assert_eq!(ep.idle_connections(), 1);
    ep.reap(IDLE_TIMEOUT);
    assert_eq!(ep.idle_connections(), 1, "a fresh idle connection stays");
    ep.reap(Duration::ZERO);
    assert_eq!(ep.idle_connections(), 0);
    // Closing it frees its slot at once.
    assert_eq!(ep.open_connections(), 0);
}

#[tokio::test]
async fn a_dead_endpoint_is_a_retryable_connect_error() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = endpoint(addr).send_h1(get(), None, TIMEOUT).await.err().unwrap();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.kind(), "app_connection_refused");
}
