//! Sidecar in Kubernetes: adding it to workloads (`inject`, by hand or by the admission
//! `webhook`) and telling the app when its mounted config changes (`notify`).

pub mod inject;
pub mod notify;
pub mod webhook;
