//! Where an upstream listens and the stream to it: a TCP address, or a Unix domain socket
//! that an app in the same pod can listen on in a shared volume (`unix:/path/app.sock`),
//! which skips the TCP stack both ways.
//!
//! Not responsible for retries or timeouts (`proxy::connect`) or for what is spoken on the
//! stream.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// The prefix that marks a Unix socket path in config (as in Envoy, nginx and gRPC).
pub const UNIX_PREFIX: &str = "unix:";
/// `sun_path` holds 108 bytes on Linux, the last one a NUL: a longer path cannot be dialled.
const MAX_UNIX_PATH: usize = 107;

/// An upstream's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    Tcp(SocketAddr),
    /// An absolute filesystem path (abstract sockets are not supported).
    Unix(Arc<Path>),
}

impl Addr {
    /// `unix:/abs/path` as a Unix socket; anything else is for the caller's TCP parser.
    /// `None` when the text is not a `unix:` address at all.
    pub fn parse_unix(text: &str) -> Option<Result<Addr, String>> {
        let path = text.strip_prefix(UNIX_PREFIX)?;
        Some(if !path.starts_with('/') {
            Err(format!("`{text}`: a Unix socket path must be absolute, like `unix:/var/run/app.sock`"))
        } else if path.len() > MAX_UNIX_PATH {
            Err(format!(
                "`{text}`: a Unix socket path may have at most {MAX_UNIX_PATH} bytes (it has {})",
                path.len()
            ))
        } else {
            Ok(Addr::Unix(Arc::from(Path::new(path))))
        })
    }

    /// The authority a request to this address carries when the client sent none (an
    /// HTTP/1.0 request without `Host`, a health check): a Unix socket has no host name, so
    /// `localhost`, as curl's `--unix-socket` sends.
    pub fn authority(&self) -> String {
        match self {
            Addr::Tcp(a) => a.to_string(),
            Addr::Unix(_) => "localhost".to_owned(),
        }
    }

    /// One connect attempt, without a timeout (the caller bounds it).
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                // Requests are small writes that must leave now, not wait for Nagle.
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Addr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p).await?)),
        }
    }
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Self {
        Addr::Tcp(a)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => a.fmt(f),
            Addr::Unix(p) => write!(f, "{UNIX_PREFIX}{}", p.display()),
        }
    }
}

/// Written as in config (`/config` shows what the file said).
impl Serialize for Addr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A connected stream to an upstream. An enum rather than a boxed trait object: the branch
/// is predictable and costs nothing next to the syscall behind it.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS originated to an upstream (outbound `upstream.tls`). Boxed: the session state
    /// is large, and most streams are plain.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether nothing arrived on the stream since it was last read to exhaustion: no EOF,
    /// no reset, no bytes. The reactor's cached readiness answers without a syscall; only when
    /// it says "readable" is the socket read (one byte, never consumed on a live stream:
    /// `WouldBlock`) to tell.
    pub fn is_quiet(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let ready = match self {
            Stream::Tcp(s) => s.poll_read_ready(&mut cx),
            Stream::Unix(s) => s.poll_read_ready(&mut cx),
            Stream::Tls(s) => s.get_ref().0.poll_read_ready(&mut cx),
        };
        if ready.is_pending() {
            return true;
        }
        let mut probe = [0u8; 1];
        let read = match self {
            Stream::Tcp(s) => s.try_read(&mut probe),
            Stream::Unix(s) => s.try_read(&mut probe),
            // Reading would consume a TLS record (a close_notify, most likely): an idle TLS
            // connection with anything to read is treated as closing.
            Stream::Tls(_) => return false,
        };
        matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
            Stream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        both!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn unix_addresses_parse_and_print_as_written() {
        let a = Addr::parse_unix("unix:/run/app.sock").unwrap().unwrap();
        assert_eq!(a.to_string(), "unix:/run/app.sock");
        assert_eq!(a.authority(), "localhost");
        assert!(Addr::parse_unix("127.0.0.1:8080").is_none());
        assert!(Addr::parse_unix("unix:app.sock").unwrap().unwrap_err().contains("absolute"));
        let long = format!("unix:/{}", "a".repeat(MAX_UNIX_PATH));
        assert!(Addr::parse_unix(&long).unwrap().unwrap_err().contains("at most 107 bytes"));
    }

    #[tokio::test]
    async fn a_unix_socket_carries_bytes_both_ways() {
        let dir = std::env::temp_dir().join(format!("sidecar-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("echo.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        let addr = Addr::parse_unix(&format!("unix:{}", path.display())).unwrap().unwrap();
        let mut s = addr.connect().await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
