//! Telling a service manager where sluice is in its life (sd_notify): a
//! no-op unless NOTIFY_SOCKET is set, as under systemd with Type=notify.

use sd_notify::NotifyState;

/// Listening: systemd considers the unit started.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload started; `ready()` ends it.
pub fn reloading() {
    // MONOTONIC_USEC lets Type=notify-reload units match the reload too.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The drain started.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// Client connections that leave room, under the open-file limit, for each
/// one's upstream socket and for what the process holds besides (listeners,
/// the runtime, logs, pooled connections): half of what is left after a
/// reserve, so the proxy refuses new clients before it cannot open upstream
/// connections for the ones it has.
pub fn connections_for_open_file_limit() -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let reserve = 32 + limit / 16;
    (limit.saturating_sub(reserve) / 2).max(1)
}

/// Raises the soft open-file limit to the hard one: each proxied stream
/// holds two sockets, and the usual soft default (1024) caps a sidecar at
/// a few hundred streams.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(limit = n, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}
