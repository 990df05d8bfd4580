//! sluice: a reverse-proxy sidecar for LLM APIs.
//!
//! An application points its OpenAI-compatible SDK at sluice; sluice routes
//! each request to a configured upstream, injects the provider key, and
//! streams the response back frame by frame.
//!
//! # Module map
//! - [`config`]: TOML in two stages, raw (serde) then resolved; errors carry
//!   file, line, column and key path.
//! - [`server`]: accept loop, optional TLS, HTTP/1.1 or h2c, bounded drain.
//! - [`proxy`]: the request story; the only module that calls the others.
//! - [`route`]: first-match routing on path prefix and method.
//! - [`body`]: request bodies (buffered for replay up to a cap, or streamed)
//!   and the response body wrapper (frames untouched, bytes counted).
//! - [`upstream`]: pooled rustls client, request rewrite, error causes.
//! - [`error`]: the errors sluice answers itself, in OpenAI's shape.
//! - [`access`]: the one log line per request.
//! - [`logging`]: text or JSON logs.
//! - [`systemd`]: sd_notify states and the open-file limit.
//!
//! # Request flow
//! `server -> proxy::Proxy::handle -> route -> body -> upstream -> body`

pub mod access;
pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod response;
pub mod retry;
pub mod route;
pub mod server;
pub mod systemd;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Serves `config` on an already bound `listener` until `shutdown`
/// resolves, then drains. Tests bind port 0 and pass their own shutdown.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let opts = server::ServerOptions {
        header_read_timeout: config.server.header_read_timeout,
        shutdown_grace: config.server.shutdown_grace,
        tls: config
            .server
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from),
    };
    let proxy = Arc::new(proxy::Proxy::new(&config));
    if let Ok(addr) = listener.local_addr() {
        let tls = if opts.tls.is_some() { "https" } else { "http" };
        tracing::info!(routes = config.routes.len(), "listening on {tls}://{addr}");
    }
    systemd::ready();
    server::serve(listener, opts, proxy, shutdown).await;
}
