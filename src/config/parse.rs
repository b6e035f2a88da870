//! The parsers every section shares: socket addresses, durations, sizes, and `Ctx`, which
//! collects problems with their field paths while validation goes on.
//!
//! Not responsible for any section's rules or defaults: those live in the section's file.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Deserialize;

use super::Problem;
use crate::net::Addr;

/// A duration or size as written: `5s` and `64KiB` are strings, a bare `65536` is a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Scalar {
    Int(u64),
    Str(String),
}

/// Collects problems during validation. Every helper returns a usable value even when the
/// input is bad, so validation goes on and reports every problem in one pass.
pub(super) struct Ctx<'a> {
    problems: &'a mut Vec<Problem>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(problems: &'a mut Vec<Problem>) -> Self {
        Ctx { problems }
    }

    pub(super) fn bad(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into() });
    }

    /// `text` as an address. A bad one is reported and replaced by a placeholder, port 0,
    /// which callers use to skip checks that would only repeat the problem.
    pub(super) fn addr(&mut self, path: &str, text: &str) -> SocketAddr {
        match parse_socket_addr(text) {
            Ok(a) => a,
            Err(m) => {
                self.bad(path, m);
                // Placeholder so validation can go on; the config is rejected anyway.
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// An upstream's address: `unix:/path` or what [`Ctx::addr`] takes.
    pub(super) fn upstream(&mut self, path: &str, text: &str) -> Addr {
        match Addr::parse_unix(text) {
            Some(Ok(a)) => a,
            Some(Err(m)) => {
                self.bad(path, m);
                Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
            }
            None => Addr::Tcp(self.addr(path, text)),
        }
    }

    /// `{at}.name`: the label a section's entry goes by in metrics and logs, so letters,
    /// digits, `-`, `_` and `.` only. `missing` says what to write when there is none.
    pub(super) fn name(&mut self, at: &str, name: Option<String>, missing: &str) -> String {
        match name {
            Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => {
                n
            }
            Some(n) => {
                self.bad(
                    format!("{at}.name"),
                    format!("`{n}` is not a name: letters, digits, `-`, `_` and `.` only"),
                );
                n
            }
            None => {
                self.bad(format!("{at}.name"), missing);
                String::new()
            }
        }
    }

    pub(super) fn duration(&mut self, path: &str, raw: Option<&Scalar>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) => d,
                Err(m) => {
                    self.bad(path, m);
                    default
                }
            },
        }
    }

    pub(super) fn positive_duration(
        &mut self,
        path: &str,
        raw: Option<&Scalar>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(path, raw, default);
        if d.is_zero() {
            self.bad(path, "must be longer than 0s");
        }
        d
    }
}

/// `127.0.0.1:8080`, `[::1]:8080`, or `localhost:8080` (resolved once, here).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "`{text}` is not an address: expected HOST:PORT, like `127.0.0.1:8080` (or `unix:/path` where a Unix socket is allowed)"
        ));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("`{text}`: `{port}` is not a port number"));
    }
    if host != "localhost" {
        return Err(format!(
            "`{text}` is not an address: expected IP:PORT, like `127.0.0.1:8080` (names other than localhost are not resolved here)"
        ));
    }
    (host, port.parse::<u16>().unwrap_or(0))
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.find(|a| a.is_ipv4()))
        .ok_or_else(|| format!("`{text}`: localhost does not resolve"))
}

pub(super) fn parse_duration(s: &Scalar) -> Result<Duration, String> {
    match s {
        Scalar::Int(0) => Ok(Duration::ZERO),
        Scalar::Int(n) => Err(format!("`{n}` has no unit: write a duration like `{n}s` or `{n}ms`")),
        Scalar::Str(t) => humantime::parse_duration(t.trim())
            .map_err(|e| format!("`{t}` is not a duration ({e}): write it like `250ms`, `5s` or `2m`")),
    }
}

/// `65536`, `64KiB`, `10MiB`, `1GiB`, `500KB`, `2MB`.
pub(super) fn parse_size(s: &Scalar) -> Result<u64, String> {
    let t = match s {
        Scalar::Int(n) => return Ok(*n),
        Scalar::Str(t) => t.trim(),
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{t}` is not a size: write it like `64KiB`, `10MiB` or a number of bytes");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "KB" | "kB" | "K" | "k" => 1000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// Durations in the typed config are shown (by `/config`) the way they are written: `15s`.
pub(super) mod duration_str {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size(&Scalar::Str("64KiB".into())), Ok(65536));
        assert_eq!(parse_size(&Scalar::Str("10MiB".into())), Ok(10 << 20));
        assert_eq!(parse_size(&Scalar::Int(100)), Ok(100));
        assert!(parse_size(&Scalar::Str("KiB".into())).is_err());
        assert_eq!(parse_duration(&Scalar::Str("250ms".into())), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(&Scalar::Str("2m".into())), Ok(Duration::from_secs(120)));
    }
}
