//! The drain, one type for everything that must know about it (linkerd's
//! `drain` is the model): the server holds the [`Signal`], everyone else a
//! [`Watch`].
//!
//! Two phases. `start` (SIGTERM): `/readyz` turns 503, idle connections
//! close, requests that still arrive are answered 503. `cut` (when
//! `shutdown_grace` runs out): streams end with their error event or an
//! abort, requests still waiting for an upstream are answered 503.
//! Connections hold a [`Held`] guard, so the signal knows when the last one
//! has gone.
//!
//! Cheap on the hot path: a request reads one flag; a stream registers its
//! wait once and then reads the flag on each poll. Waiters of the cut are
//! spread over shards so thousands of streams do not share one lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// Waiter lists for the cut.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    cut: AtomicBool,
    /// Woken when the drain starts (idle connections wait on it).
    started: Notify,
    cut_shards: [Arc<Notify>; SHARDS],
    /// Connections still held.
    held: AtomicUsize,
    /// Woken when the last held connection goes.
    released: Notify,
}

/// Starts the drain, cuts it, and waits for it to end.
#[derive(Debug)]
pub struct Signal {
    inner: Arc<Inner>,
}

/// What the drain looks like to a connection, a request or a stream.
#[derive(Debug, Clone)]
pub struct Watch {
    inner: Arc<Inner>,
}

/// A new drain, not started.
pub fn channel() -> (Signal, Watch) {
    let inner = Arc::new(Inner::default());
    let watch = Watch {
        inner: inner.clone(),
    };
    (Signal { inner }, watch)
}

impl Signal {
    pub fn watch(&self) -> Watch {
        Watch {
            inner: self.inner.clone(),
        }
    }

    /// The drain begins: wakes everything waiting for it.
    pub fn start(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.started.notify_waiters();
    }

    /// The grace ran out: wakes every stream and request still waiting.
    pub fn cut(&self) {
        self.inner.cut.store(true, Ordering::SeqCst);
        self.inner
            .cut_shards
            .iter()
            .for_each(|n| n.notify_waiters());
    }

    /// Connections still held.
    pub fn connections(&self) -> usize {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Resolves once no connection is held.
    pub async fn drained(&self) {
        loop {
            // Registered before the count is read, so a release in between is seen.
            let released = self.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            released.await;
        }
    }
}

impl Watch {
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    pub fn is_cut(&self) -> bool {
        self.inner.cut.load(Ordering::SeqCst)
    }

    /// Resolves once the drain has started (at once if it has). Registers
    /// on its first poll and then only reads the flag: the task polling it
    /// must stay the same, as a connection's does.
    pub async fn draining(&self) {
        // Created before the flag is read, so a start in between is not missed.
        let started = self.inner.started.notified();
        tokio::pin!(started);
        let mut registered = false;
        std::future::poll_fn(|cx| {
            if self.is_draining() {
                return Poll::Ready(());
            }
            if !registered {
                registered = true;
                return started.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await
    }

    /// Resolves once the drain is cut. Owned, so a response body can keep it.
    pub fn cut(&self) -> CutWait {
        let shard = &self.inner.cut_shards[fastrand::usize(..SHARDS)];
        CutWait {
            inner: self.inner.clone(),
            notified: Box::pin(shard.clone().notified_owned()),
            registered: false,
        }
    }

    /// Counts a connection until the guard is dropped.
    pub fn hold(&self) -> Held {
        self.inner.held.fetch_add(1, Ordering::SeqCst);
        Held {
            inner: self.inner.clone(),
        }
    }
}

/// A connection the drain waits for.
#[derive(Debug)]
pub struct Held {
    inner: Arc<Inner>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.inner.held.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.released.notify_waiters();
        }
    }
}

/// See [`Watch::cut`].
#[derive(Debug)]
pub struct CutWait {
    inner: Arc<Inner>,
    notified: Pin<Box<OwnedNotified>>,
    registered: bool,
}

impl CutWait {
    pub fn is_cut(&self) -> bool {
        self.inner.cut.load(Ordering::SeqCst)
    }
}

impl Future for CutWait {
    type Output = ();

    /// Registers on the first poll and then only reads the flag:
    /// `notify_waiters` wakes the waker registered, which stays right because
    /// hyper polls a request, and a body, from one task.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.is_cut() {
            return Poll::Ready(());
        }
        if !this.registered {
            this.registered = true;
            // Created before this check, so a cut in between is not missed.
            return this.notified.as_mut().poll(cx);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_stream_wakes_when_cut_including_late_ones() {
        let (signal, watch) = channel();
        let waiting: Vec<_> = (0..64).map(|_| tokio::spawn(watch.cut())).collect();
        tokio::task::yield_now().await;
        assert!(!watch.is_cut());
        signal.cut();
        for w in waiting {
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .unwrap()
                .unwrap();
        }
        // A wait made after the cut resolves at once.
        tokio::time::timeout(Duration::from_millis(100), watch.cut())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn connections_see_the_start_and_the_signal_sees_them_go() {
        let (signal, watch) = channel();
        let held: Vec<_> = (0..3).map(|_| watch.hold()).collect();
        let idle = {
            let watch = watch.clone();
            tokio::spawn(async move { watch.draining().await })
        };
        tokio::task::yield_now().await;
        assert!(!idle.is_finished() && !watch.is_draining());
        signal.start();
        tokio::time::timeout(Duration::from_secs(1), idle)
            .await
            .unwrap()
            .unwrap();
        // Ready at once when the drain began before the wait was made.
        tokio::time::timeout(Duration::from_millis(100), watch.draining())
            .await
            .unwrap();
        assert_eq!(signal.connections(), 3);
        let drained = tokio::spawn(async move { signal.drained().await });
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .unwrap()
            .unwrap();
    }
}
