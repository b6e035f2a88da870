//! Sidecar: one small binary beside an application that takes TLS, metrics, logs,
//! readiness, drain and outbound calls off it. `ARCHITECTURE.md` maps the modules.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod drain;
pub mod files;
pub mod health;
pub mod inbound;
pub mod k8s;
pub mod logship;
pub mod net;
pub mod outbound;
pub mod proxy;
pub mod readiness;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;
