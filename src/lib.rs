//! sluice: a reverse-proxy sidecar for LLM APIs.
//!
//! An application points its OpenAI-compatible SDK at sluice; sluice routes
//! each request to a configured upstream, injects the provider key, and
//! streams the response back frame by frame.
//!
//! # Module map
//! Transport (imports nothing above it; a test holds it to that):
//! - [`server`]: accept loop, optional TLS, HTTP/1.1 on our own server, h2
//!   and anything unusual on hyper; serves a [`server::Handler`].
//! - [`client`]: upstream connection pools; HTTP/1.1 on our own codec, h2
//!   (by ALPN) on hyper.
//! - [`http1`]: what the two HTTP/1.1 codecs share (framing, the head
//!   copy, reads, the header encoder, the body decoder) and the rules that
//!   guard against smuggling and desync.
//! - [`drain`]: the drain, one signal for connections, requests and streams.
//!
//! The proxy:
//! - [`proxy`]: the request story; the only module that calls the others.
//!   Per-config state (`build.rs`), per-request context (`ctx.rs`), model
//!   routing (`model.rs`), the attempt loop (`attempts.rs`), one attempt
//!   (`exchange.rs`), the response body (`response.rs`).
//! - [`route`]: first-match routing on path prefix and method; path checks.
//! - [`backend`]: where an attempt goes: an upstream's pool, its provider,
//!   per-backend metrics; the request rewrite; a model's deployments, the
//!   walk down its fallback chain and the balancers.
//! - [`provider`]: API dialects (OpenAI, Anthropic): auth headers, wait
//!   hints, the quota check, error shapes.
//! - [`limit`]: rate limits (governor) and the in-flight cap.
//! - [`store`]: the shared bucket store (Redis) for limits across replicas.
//! - [`tokens`]: token-per-minute limits: a GCRA cell charged an estimate at
//!   admission and settled with the actual count.
//! - [`body`]: request bodies, buffered for replay up to a cap or streamed.
//! - [`scan`]: the incremental scanner over a JSON body: top-level fields
//!   and their byte spans without a JSON tree; slicing and splicing chunks.
//! - [`retry`]: the retry verdict, backoff, the retry budget.
//! - [`error`]: the errors sluice answers itself.
//! - [`access`]: the access line's format and its batched writer.
//! - [`config`]: TOML in two stages, raw (serde) then resolved; errors carry
//!   file, line, column and key path.
//! - [`admin`], [`metrics`]: /healthz /readyz /metrics.
//! - [`logging`]: text or JSON logs. [`systemd`]: sd_notify, the fd limit.
//!
//! # Request flow
//! `server -> proxy::Proxy::handle -> route -> limit -> body -> attempts
//! (route picks a backend, backend sends, retry judges) -> response body ->
//! ctx.finish (metrics, slot, access line)`. docs/ARCHITECTURE.md has the
//! longer version.

pub mod access;
pub mod admin;
pub mod backend;
pub mod body;
pub mod client;
pub mod config;
pub mod drain;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod http1;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod retry;
pub mod route;
pub mod scan;
pub mod server;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tokens;
pub mod usage;

#[cfg(test)]
mod layering;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::{Config, ConfigErrors};

/// Bodies up to this are read whole by sluice's own HTTP/1.1 server, when
/// the config's limits allow.
const WHOLE_BODY_MAX: u64 = 1024 * 1024;

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
    let (signal, drain) = drain::channel();
    let held: Arc<body::HeldBytes> = Arc::default();
    let shared = Arc::new(proxy::Shared {
        metrics: Arc::default(),
        drain: drain.clone(),
        held: held.clone(),
    });
    shared.metrics.watch_held(held);
    let metrics = shared.metrics.clone();
    let proxy = Arc::new(ArcSwap::from_pointee(proxy::Proxy::new(
        &config, &shared, None,
    )));
    let whole_body = Arc::new(AtomicU64::new(whole_body_limit(&config)));
    let opts = server::ServerOptions {
        header_read_timeout: config.server.header_read_timeout,
        shutdown_grace: config.server.shutdown_grace,
        tls: config
            .server
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from),
        whole_body: whole_body.clone(),
        send_timeout: config.server.send_timeout,
        max_connections: config
            .server
            .max_connections
            .map_or_else(systemd::connections_for_open_file_limit, |n| n as usize),
    };
    if let Ok(addr) = listeners.data.local_addr() {
        let tls = if opts.tls.is_some() { "https" } else { "http" };
        tracing::info!(
            routes = config.routes.len(),
            max_connections = opts.max_connections,
            "listening on {tls}://{addr}"
        );
    }
    let admin = listeners.admin.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!("admin listening on http://{addr}");
        }
        tokio::spawn(admin::serve(l, drain.clone(), metrics.clone()))
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
                    let limit = whole_body_limit(&new);
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
                    whole_body.store(limit, Ordering::Relaxed);
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
    let draining = async {
        shutdown.await;
        systemd::stopping();
        // No reload (nor its READY=1) after STOPPING=1.
        reloader.abort();
    };
    let service = Arc::new(proxy::Service(proxy));
    let traces = service.0.clone();
    server::serve(listeners.data, opts, service, signal, draining).await;
    if let Some(a) = admin {
        a.abort();
    }
    // The spans of the last requests go out before the process ends.
    let telemetry = traces.load().telemetry();
    if let Some(t) = telemetry {
        t.close().await;
    }
}

/// The largest body the HTTP/1.1 server reads whole: one the proxy would
/// hold for replay anyway, and within what it accepts.
fn whole_body_limit(c: &Config) -> u64 {
    c.server
        .max_request_body
        .min(c.server.retry_buffer)
        .min(WHOLE_BODY_MAX)
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
        s.send_timeout,
        s.max_connections,
        log,
    )
}
