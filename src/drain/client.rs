//! `sidecar drain`: asks a running sidecar to drain (`POST /shutdown` on its admin server) and
//! waits until the process has exited, for Kubernetes' `preStop` hook.
//!
//! Not responsible for the drain itself (`crate::app`). One HTTP/1.1 exchange over a plain
//! TCP socket: the image has no curl or shell, and a runtime would be more code than this.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long one connect or read to the admin server may take. The admin server runs on its
/// own thread and answers in microseconds, even while the data plane is busy.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the admin port is tried while the process drains: fine enough that the preStop
/// hook returns within a tenth of a second of the exit, and ten connects a second cost nothing.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(
        "nothing answers at {addr}: {error}; is the sidecar running with admin.listen there (--admin ADDR)?"
    )]
    Unreachable { addr: SocketAddr, error: std::io::Error },
    #[error("POST http://{addr}{path}: {error}")]
    Request { addr: SocketAddr, path: &'static str, error: std::io::Error },
    #[error("POST http://{addr}{path} answered `{status}`: {body}")]
    Refused { addr: SocketAddr, path: &'static str, status: String, body: String },
    #[error("the sidecar at {addr} is still running {timeout:?} after it was asked to drain")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Asks the sidecar whose admin server is at `admin` to drain, then waits until its admin
/// port refuses connections (the process has exited), for at most `timeout` in all.
pub fn drain(admin: SocketAddr, timeout: Duration) -> Result<Duration, DrainError> {
    let started = Instant::now();
    post(admin, "/shutdown")?;
    loop {
        match TcpStream::connect_timeout(&admin, IO_TIMEOUT) {
            // The listener is closed only when the process exits: the admin server keeps
            // answering (/ready 503) through the whole drain.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(started.elapsed()),
            _ if started.elapsed() >= timeout => return Err(DrainError::Timeout { addr: admin, timeout }),
            _ => std::thread::sleep(POLL),
        }
    }
}

/// `sidecar drain --announce`, a native sidecar's preStop hook: `POST /prestop`, so the pod
/// turns not ready while the sidecar keeps serving the app until the kubelet's SIGTERM, which
/// comes only after the app has exited. Returns at once.
pub fn announce(admin: SocketAddr) -> Result<(), DrainError> {
    post(admin, "/prestop")
}

fn post(addr: SocketAddr, path: &'static str) -> Result<(), DrainError> {
    let mut conn = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|error| DrainError::Unreachable { addr, error })?;
    let request = |error| DrainError::Request { addr, path, error };
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(request)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(request)?;
    write!(conn, "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .map_err(request)?;
    // `Connection: close`: the answer ends where the stream does. Small, so bounded.
    let mut answer = Vec::new();
    conn.take(16 * 1024).read_to_end(&mut answer).map_err(request)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    match status.split(' ').nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ => Err(DrainError::Refused { addr, path, status: status.to_owned(), body: body.trim().to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_listening_is_named() {
        // A port just freed: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let err = drain(addr, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, DrainError::Unreachable { .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("nothing answers at {addr}: ")), "{err}");
    }

    #[test]
    fn a_refusal_is_reported_with_its_status_and_body() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0; 1024];
            let _ = c.read(&mut buf).unwrap();
            c.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nloopback\r\n").unwrap();
        });
        let err = drain(addr, Duration::from_secs(1)).unwrap_err();
        server.join().unwrap();
        assert_eq!(
            err.to_string(),
            format!("POST http://{addr}/shutdown answered `HTTP/1.1 403 Forbidden`: loopback")
        );
    }
}
