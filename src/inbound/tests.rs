//! `Inbound::apply` on real sockets: what a reload keeps, rebuilds and refuses.

use std::path::{Path, PathBuf};

use prometheus_client::registry::Registry;

use super::*;
use crate::config::AccessLogConfig;
use crate::drain::Drain;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(text: &str) -> Config {
    crate::config::parse(Path::new("test.yaml"), text).unwrap()
}

fn inbound() -> (Inbound, Drain) {
    let mut registry = Registry::default();
    let families = Families::register(&mut registry);
    let off = AccessLogConfig {
        enabled: false,
        ..config("inbound: [{name: a, listen: 127.0.0.1:1}]").telemetry.access_log
    };
    let access_log = AccessLog::start(&off, &mut registry).unwrap();
    let files = FileWatcher::start(Duration::from_millis(50)).unwrap();
    let (drain, watch) = Drain::new();
    let tracer = crate::telemetry::Tracer::start(None, &mut registry).unwrap();
    let recorders = super::Recorders { access_log, tracer, board: Default::default() };
    (Inbound::new(families, recorders, files, watch), drain)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sidecar-inbound-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_reload_keeps_the_limiter_and_resizes_it() {
    let port = free_port();
    let (mut inbound, _drain) = inbound();
    inbound
        .apply(&config(&format!(
            "inbound: [{{name: a, listen: 127.0.0.1:{port}, limits: {{max_connections: 2}}}}]"
        )))
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let before = inbound.running[&addr].limit.clone();
    let held = (before.try_acquire().unwrap(), before.try_acquire().unwrap());
    inbound
        .apply(&config(&format!(
            "inbound: [{{name: a, listen: 127.0.0.1:{port}, limits: {{max_connections: 2}}}}]\ntelemetry: {{log_level: debug}}"
        )))
        .unwrap();
    let after = inbound.running[&addr].limit.clone();
    assert!(Arc::ptr_eq(&before, &after), "a reload must not make a new limiter");
    assert!(after.try_acquire().is_none(), "the two open connections still count");
    inbound
        .apply(&config(&format!(
            "inbound: [{{name: a, listen: 127.0.0.1:{port}, limits: {{max_connections: 3}}}}]"
        )))
        .unwrap();
    assert!(after.try_acquire().is_some());
    drop(held);
}

#[tokio::test]
async fn a_failed_bind_changes_nothing() {
    let (p1, taken) = (free_port(), std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let p2 = taken.local_addr().unwrap().port();
    let (mut inbound, _drain) = inbound();
    inbound.apply(&config(&format!("inbound: [{{name: a, listen: 127.0.0.1:{p1}}}]"))).unwrap();
    let both = format!("inbound: [{{name: a, listen: 127.0.0.1:{p1}}}, {{name: b, listen: 127.0.0.1:{p2}}}]");
    let err = inbound.apply(&config(&both)).unwrap_err();
    assert!(err.to_string().contains("listener b: bind"), "{err}");
    assert_eq!(inbound.running.len(), 1);
    // Removing it stops the accept loop: the port can be bound again.
    drop(taken);
    inbound.apply(&config(&format!("inbound: [{{name: b, listen: 127.0.0.1:{p2}}}]"))).unwrap();
    assert_eq!(inbound.running.len(), 1);
    for _ in 0..100 {
        if std::net::TcpListener::bind(("127.0.0.1", p1)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the removed listener still holds its port");
}

#[tokio::test]
async fn tls_is_reused_only_for_the_same_files_and_protocol() {
    let dir = temp_dir("tls");
    crate::tls::certs::init(&dir.join("ca")).unwrap();
    crate::tls::certs::issue(&dir.join("ca"), "spiffe://test/web", &[], &dir.join("web")).unwrap();
    let port = free_port();
    let cfg = |protocol: &str| {
        config(&format!(
            "inbound: [{{name: a, listen: 127.0.0.1:{port}, protocol: {protocol}, tls: {{cert: {0}/web/tls.crt, key: {0}/web/tls.key}}}}]",
            dir.display()
        ))
    };
    let (mut inbound, _drain) = inbound();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    inbound.apply(&cfg("http")).unwrap();
    let http = inbound.tls[&addr].clone();
    assert_eq!(http.alpn(), [b"h2".to_vec(), b"http/1.1".to_vec()]);
    inbound.apply(&cfg("http")).unwrap();
    assert!(Arc::ptr_eq(&http, &inbound.tls[&addr]), "same files and protocol: reused");
    inbound.apply(&cfg("tcp")).unwrap();
    assert!(inbound.tls[&addr].alpn().is_empty(), "a TCP listener offers no ALPN");
    let _ = std::fs::remove_dir_all(&dir);
}
