//! The `admin` section: where the admin server listens.
//!
//! Not responsible for the admin server itself (`crate::admin`), nor for refusing an inbound
//! listener on the same address (`inbound` checks that, given this section's result).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use super::parse::Ctx;

/// Loopback, so the admin server is never public unless the file says so: `/shutdown` and
/// `/log-level` change the process. Port 15000 is the contract's (INTERFACE.md), the port Istio
/// gives Envoy's admin interface, so people who know that layout find it where they expect.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15000));

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    listen: Option<String>,
    remote_control: Option<bool>,
}

pub(super) fn validate(raw: RawAdmin, cx: &mut Ctx) -> AdminConfig {
    AdminConfig {
        listen: raw.listen.map_or(DEFAULT_ADMIN_LISTEN, |l| cx.addr("admin.listen", &l)),
        remote_control: raw.remote_control.unwrap_or(false),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    /// Where the admin server listens. Default [`DEFAULT_ADMIN_LISTEN`], 127.0.0.1:15000:
    /// never a public address unless the file says so.
    pub listen: SocketAddr,
    /// False (the default): `POST /shutdown`, `POST /prestop`, `PUT /log-level` and
    /// `GET /config` answer only peers on loopback, so that a pod can expose `/metrics` and
    /// the probes on `0.0.0.0` without letting the network stop or reconfigure it.
    pub remote_control: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::smallest;

    #[test]
    fn default_is_what_the_smallest_config_gets() {
        assert_eq!(smallest().admin.listen, DEFAULT_ADMIN_LISTEN);
        // The reason for the default: `/shutdown` must not be reachable from the network.
        assert!(DEFAULT_ADMIN_LISTEN.ip().is_loopback());
        assert!(!smallest().admin.remote_control);
    }
}
