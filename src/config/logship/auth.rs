//! A sink's credentials: a bearer token or a user and password, each written inline or kept
//! in a file. What `/config` and the logs show is only which kind, and where from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::super::parse::Ctx;

/// Credentials: what `/config` shows is only which kind and where from.
#[derive(Clone, PartialEq, Default)]
pub enum Auth {
    #[default]
    None,
    Bearer(Secret),
    Basic {
        user: String,
        password: Secret,
    },
}

/// A secret written in the config or kept in a file (read at each start of the shipper, so a
/// rotated Secret volume is picked up by a reload).
#[derive(Clone, PartialEq)]
pub enum Secret {
    Inline(String),
    File(PathBuf),
}

impl Secret {
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Secret::Inline(s) => Ok(s.clone()),
            Secret::File(p) => Ok(std::fs::read_to_string(p)?.trim_end().to_owned()),
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::None => "none",
            Auth::Bearer(_) => "bearer <redacted>",
            Auth::Basic { .. } => "basic <redacted>",
        })
    }
}

impl Serialize for Auth {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let shown = |secret: &Secret| match secret {
            Secret::Inline(_) => "<redacted>".to_owned(),
            Secret::File(p) => format!("<redacted, from {}>", p.display()),
        };
        let mut map = BTreeMap::new();
        match self {
            Auth::None => return s.serialize_none(),
            Auth::Bearer(t) => {
                map.insert("token", shown(t));
            }
            Auth::Basic { user, password } => {
                map.insert("user", user.clone());
                map.insert("password", shown(password));
            }
        }
        map.serialize(s)
    }
}

/// `token`/`token_file`, `user`, `password`/`password_file` as written → `Auth`, every
/// conflict reported. The files are read now as well as at each start, so `check` says what
/// `run` would refuse.
pub(super) fn validate(
    at: &str,
    cx: &mut Ctx,
    token: (Option<String>, Option<PathBuf>),
    user: Option<String>,
    password: (Option<String>, Option<PathBuf>),
) -> Auth {
    let token = secret(at, cx, "token", token);
    let password = secret(at, cx, "password", password);
    match (token, user, password) {
        (None, None, None) => Auth::None,
        (Some(t), None, None) => Auth::Bearer(t),
        (None, Some(user), Some(password)) => Auth::Basic { user, password },
        (None, Some(_), None) => {
            cx.bad(format!("{at}.password"), "missing: a user needs a `password` or `password_file`");
            Auth::None
        }
        (None, None, Some(_)) => {
            cx.bad(format!("{at}.user"), "missing: a password needs a user");
            Auth::None
        }
        (Some(_), ..) => {
            cx.bad(format!("{at}.token"), "a sink takes a bearer token or a user and password, not both");
            Auth::None
        }
    }
}

/// `name` inline or `name_file`, not both; a file that cannot be read is reported.
fn secret(at: &str, cx: &mut Ctx, name: &str, given: (Option<String>, Option<PathBuf>)) -> Option<Secret> {
    match given {
        (Some(_), Some(_)) => {
            cx.bad(format!("{at}.{name}_file"), format!("set `{name}` or `{name}_file`, not both"));
            None
        }
        (Some(v), None) => Some(Secret::Inline(v)),
        (None, Some(path)) => {
            if let Err(e) = std::fs::read(&path) {
                cx.bad(format!("{at}.{name}_file"), format!("cannot read {}: {e}", path.display()));
            }
            Some(Secret::File(path))
        }
        (None, None) => None,
    }
}
