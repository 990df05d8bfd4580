//! sluice: a reverse-proxy sidecar for LLM APIs.
//!
//! An application points its OpenAI-compatible SDK at sluice; sluice routes
//! each request to a configured upstream, injects the provider key, and
//! streams the response back frame by frame.
//!
//! # Module map
//! - [`config`]: TOML in two stages, raw (serde) then resolved; errors carry
//!   file, line, column and key path.
//! - [`server`]: accept loop, optional TLS, bounded drain; HTTP/1.1 on our
//!   own server, h2 and anything unusual on hyper.
//! - [`proxy`]: the request story; the only module that calls the others.
//! - [`route`]: first-match routing on path prefix and method.
//! - [`limit`]: rate limits (governor) and the in-flight cap.
//! - [`body`]: request bodies, buffered for replay up to a cap or streamed.
//! - [`upstream`]: request rewrite, error causes, one pool per upstream.
//! - [`client`]: the pool; HTTP/1.1 on our own codec, h2 (by ALPN) on hyper.
//!   The two HTTP/1.1 codecs share lengths, tokens and chunk sizes (`http1`).
//! - [`retry`]: backoff, upstream wait hints, the retry budget.
//! - [`response`]: the response body: frames untouched, idle/total
//!   deadlines, the SSE error event.
//! - [`error`]: the errors sluice answers itself, in OpenAI's shape.
//! - [`access`]: the one log line (and metrics) per request.
//! - [`admin`], [`metrics`]: /healthz /readyz /metrics.
//! - [`cutoff`]: the drain as requests and streams see it.
//! - [`logging`]: text or JSON logs.
//! - [`systemd`]: sd_notify states and the open-file limit.
//!
//! # Request flow
//! `server -> proxy::Proxy::handle -> route -> limit -> body -> upstream
//! (attempts, under retry) -> response`

pub mod access;
pub mod admin;
pub mod body;
pub mod client;
pub mod config;
pub mod cutoff;
pub mod error;
mod http1;
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

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::{Config, ConfigErrors};

/// The sockets sluice serves, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub data: TcpListener,
    /// `None` when `admin_listen = ""`.
    pub admin: Option<TcpListener>,
}

/// A config to switch to (or why the new file was refused), sent on SIGHUP.
pub type Reload = Result<Config, ConfigErrors>;

/// Serves `config` until `shutdown` resolves, then drains. Each message on
/// `reloads` swaps the config for new requests; in-flight ones finish on the
/// one they started with.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::UnboundedReceiver<Reload>,
) {
    let shared = Arc::new(proxy::Shared::default());
    let metrics = shared.metrics.clone();
    let health = Arc::new(admin::Health::default());
    let proxy = Arc::new(ArcSwap::from_pointee(proxy::Proxy::new(
        &config, &shared, None,
    )));
    let opts = server::ServerOptions {
        header_read_timeout: config.server.header_read_timeout,
        shutdown_grace: config.server.shutdown_grace,
        tls: config
            .server
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from),
        cutoff: shared.cutoff.clone(),
    };
    if let Ok(addr) = listeners.data.local_addr() {
        let tls = if opts.tls.is_some() { "https" } else { "http" };
        tracing::info!(routes = config.routes.len(), "listening on {tls}://{addr}");
    }
    let admin = listeners.admin.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!("admin listening on http://{addr}");
        }
        tokio::spawn(admin::serve(l, health.clone(), metrics.clone()))
    });
    let (swap, m, sh) = (proxy.clone(), metrics.clone(), shared.clone());
    let at_start = restart_only(&config);
    let reloader = tokio::spawn(async move {
        while let Some(reload) = reloads.recv().await {
            systemd::reloading();
            match reload {
                Ok(new) => {
                    if restart_only(&new) != at_start {
                        tracing::warn!(
                            "listen, admin_listen, tls, header_read_timeout, shutdown_grace or [log] changed: \
                             those take a restart; the rest of the new config applies now"
                        );
                    }
                    // Building it parses root certificates: off the runtime
                    // thread, which may be the only one (a 1-CPU sidecar).
                    let routes = new.routes.len();
                    let (prev, sh) = (swap.load_full(), sh.clone());
                    let built = tokio::task::spawn_blocking(move || {
                        proxy::Proxy::new(&new, &sh, Some(&prev))
                    });
                    let Ok(next) = built.await else {
                        tracing::error!("reload failed, keeping the running config");
                        m.reload(false);
                        systemd::ready();
                        continue;
                    };
                    swap.store(Arc::new(next));
                    m.reload(true);
                    tracing::info!(routes, "config reloaded");
                }
                Err(errors) => {
                    for line in errors.to_string().lines() {
                        tracing::error!("reload refused, keeping the running config: {line}");
                    }
                    m.reload(false);
                }
            }
            systemd::ready();
        }
    });
    systemd::ready();
    let cutoff = shared.cutoff.clone();
    let draining = async {
        shutdown.await;
        health.start_draining();
        cutoff.start_draining();
        // No reload (nor its READY=1) after STOPPING=1.
        reloader.abort();
    };
    server::serve(listeners.data, opts, proxy, draining).await;
    if let Some(a) = admin {
        a.abort();
    }
}

/// The settings read only at start; a reload that changes them says so.
fn restart_only(c: &Config) -> impl PartialEq {
    let s = &c.server;
    let log = (c.log.level.clone(), c.log.format);
    (
        s.listen,
        s.admin_listen,
        s.tls.is_some(),
        s.header_read_timeout,
        s.shutdown_grace,
        log,
    )
}
