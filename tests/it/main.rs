//! All integration tests in one binary (one link, shared support code).

mod admin;
mod config_cli;
mod forwarding;
mod hardening;
mod limits;
mod logging;
mod models;
mod request_body;
mod retries;
mod robustness;
mod routing;
mod sdk;
mod server_h1;
mod shutdown;
mod store;
mod streaming;
mod support;
mod systemd;
#[cfg(feature = "otel")]
mod telemetry;
mod timeouts;
mod tls;
mod upstream_h1;
mod upstream_upload;
mod usage;
