//! The `admin` section: where the admin server listens.
//!
//! Not responsible for the admin server itself (`crate::admin`), nor for refusing an inbound
//! listener on the same address (`inbound` checks that, given this section's result).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::parse::Ctx;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    listen: Option<String>,
}

pub(super) fn validate(raw: RawAdmin, cx: &mut Ctx) -> AdminConfig {
    AdminConfig { listen: cx.addr("admin.listen", raw.listen.as_deref(), "127.0.0.1:15000") }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    /// Where the admin server listens. Default 127.0.0.1:15000: never a public address unless
    /// the file says so, because `/shutdown` and `/log-level` change the process.
    pub listen: SocketAddr,
}
