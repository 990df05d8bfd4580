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

/// Raises the soft open-file limit to the hard one: each proxied stream
/// holds two sockets, and the usual soft default (1024) caps a sidecar at
/// a few hundred streams.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(limit = n, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}
