//! Logging set-up: text or JSON lines on stderr, filtered by `[log] level`
//! unless RUST_LOG is set.

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

/// Installs the global subscriber. Call once, before serving.
pub fn init(log: &Log) {
    crate::access::set_format(log.format);
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!("sluice: ignoring invalid RUST_LOG ({e}); using [log] level");
            EnvFilter::new(&log.level)
        }),
        _ => EnvFilter::new(&log.level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
