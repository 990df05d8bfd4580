//! The drain as requests and streams see it: `draining` from SIGTERM on,
//! `fired` once `shutdown_grace` runs out. Cheap on the hot path: waiting
//! costs an atomic load per poll; the shared waiter lists are locked only
//! to register (once) and to unregister, and are spread over shards.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// Waiter lists, so thousands of streams do not share one lock.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
pub struct Cutoff {
    draining: AtomicBool,
    fired: AtomicBool,
    shards: [Arc<Notify>; SHARDS],
}

impl Cutoff {
    /// The drain began: requests that still get through are answered 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The grace ran out: wakes everything waiting.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.shards.iter().for_each(|n| n.notify_waiters());
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Resolves once the cutoff has fired.
    pub fn wait(self: &Arc<Self>) -> CutoffWait {
        let shard = &self.shards[fastrand::usize(..SHARDS)];
        CutoffWait {
            cutoff: self.clone(),
            notified: Box::pin(shard.clone().notified_owned()),
            registered: false,
        }
    }
}

/// Registers its waker on the first poll and then only reads the flag:
/// `notify_waiters` wakes the waker registered, which stays right because
/// hyper polls a request, and a body, from one task.
#[derive(Debug)]
pub struct CutoffWait {
    cutoff: Arc<Cutoff>,
    notified: Pin<Box<OwnedNotified>>,
    registered: bool,
}

impl CutoffWait {
    pub fn fired(&self) -> bool {
        self.cutoff.fired()
    }
}

impl Future for CutoffWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.cutoff.fired() {
            return Poll::Ready(());
        }
        if !this.registered {
            this.registered = true;
            // Created before this check, so a fire in between is not missed.
            return this.notified.as_mut().poll(cx);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_wakes_when_fired_including_late_ones() {
        let cutoff = Arc::new(Cutoff::default());
        let waiting: Vec<_> = (0..64).map(|_| tokio::spawn(cutoff.wait())).collect();
        tokio::task::yield_now().await;
        assert!(!cutoff.fired());
        cutoff.fire();
        for w in waiting {
            tokio::time::timeout(std::time::Duration::from_secs(1), w)
                .await
                .unwrap()
                .unwrap();
        }
        // A wait created after the fire resolves at once.
        tokio::time::timeout(std::time::Duration::from_millis(100), cutoff.wait())
            .await
            .unwrap();
    }
}
