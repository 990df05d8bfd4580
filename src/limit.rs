//! Admission per route: a GCRA rate limit (governor) for the whole route or
//! per client key, and a cap on requests in flight. Checked right after
//! routing, before the body is read, so a rejected request costs almost
//! nothing and never reaches the upstream.
//!
//! Limits are per sluice process: N replicas each enforce their own.

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{RateLimitConfig, RateLimitPer};
use crate::error::ProxyError;

/// How often stale client keys are dropped.
pub(crate) const EVICT_EVERY: Duration = Duration::from_secs(30);
/// The bucket shared by requests without the client key header.
const ANONYMOUS: u64 = 0;

/// One route's limits.
pub struct Limiter<C: Clock = DefaultClock> {
    rate: Option<Rate<C>>,
    in_flight: Option<Arc<Semaphore>>,
    max_wait: Duration,
    key_header: HeaderName,
    /// Seeded per process: client keys are stored only as this hash.
    hasher: RandomState,
    requests_per_minute: u32,
    config: RateLimitConfig,
    clock: C,
}

enum Rate<C: Clock> {
    Route(RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>),
    Client(RateLimiter<u64, DashMapStateStore<u64>, C, NoOpMiddleware<C::Instant>>),
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("requests_per_minute", &self.requests_per_minute)
            .field("in_flight", &self.in_flight)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl Limiter<DefaultClock> {
    pub fn new(config: &RateLimitConfig) -> Arc<Self> {
        let limiter = Arc::new(Self::with_clock(config, DefaultClock::default()));
        if matches!(limiter.rate, Some(Rate::Client(_))) {
            spawn_eviction(Arc::downgrade(&limiter));
        }
        limiter
    }
}

impl<C: Clock + Clone> Limiter<C> {
    pub fn with_clock(config: &RateLimitConfig, clock: C) -> Self {
        let quota = NonZeroU32::new(config.requests_per_minute).map(|rpm| {
            let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
            Quota::per_minute(rpm).allow_burst(burst)
        });
        let rate = quota.map(|q| match config.per {
            RateLimitPer::Route => Rate::Route(RateLimiter::direct_with_clock(q, clock.clone())),
            RateLimitPer::Client => Rate::Client(RateLimiter::dashmap_with_clock(q, clock.clone())),
        });
        Self {
            rate,
            in_flight: (config.max_concurrent > 0)
                .then(|| Arc::new(Semaphore::new(config.max_concurrent as usize))),
            max_wait: config.max_wait,
            key_header: config.client_key_header.clone(),
            hasher: RandomState::new(),
            requests_per_minute: config.requests_per_minute,
            config: config.clone(),
            clock,
        }
    }

    /// Admits a request or says why not. Waits up to `max_wait` (and never
    /// past `deadline`) for a permit; the returned slot, if any, must be held
    /// until the response ends.
    pub async fn admit(
        &self,
        headers: &HeaderMap,
        deadline: Option<Instant>,
    ) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        let give_up = Instant::now() + self.max_wait;
        let give_up = deadline.map_or(give_up, |d| d.min(give_up));
        // The slot first: a request refused or cancelled for want of a
        // slot must not also spend a rate token.
        let slot = match &self.in_flight {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => match tokio::time::timeout_at(give_up, sem.clone().acquire_owned()).await
                {
                    Ok(Ok(slot)) => Some(slot),
                    _ => return Err(ProxyError::ConcurrencyLimited),
                },
            },
        };
        let key = self.client_key(headers);
        while let Err(wait) = self.check(key) {
            if Instant::now() + wait > give_up {
                let limit = self.requests_per_minute;
                return Err(ProxyError::RateLimited { wait, limit });
            }
            tokio::time::sleep(wait).await;
        }
        Ok(slot)
    }

    /// Takes one cell for `key`, or says how long until one is free.
    pub fn check(&self, key: u64) -> Result<(), Duration> {
        let outcome = match &self.rate {
            None => return Ok(()),
            Some(Rate::Route(r)) => r.check(),
            Some(Rate::Client(r)) => r.check_key(&key),
        };
        outcome.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// The hash of the client key header's value; never the value itself.
    pub fn client_key(&self, headers: &HeaderMap) -> u64 {
        match (&self.rate, headers.get(&self.key_header)) {
            (Some(Rate::Client(_)), Some(v)) => self.hasher.hash_one(v.as_bytes()).max(1),
            _ => ANONYMOUS,
        }
    }

    /// Drops client keys whose bucket is full again (indistinguishable from new).
    pub fn evict_stale(&self) {
        if let Some(Rate::Client(r)) = &self.rate {
            r.retain_recent();
            r.shrink_to_fit();
        }
    }

    /// The settings it was built with (an unchanged route keeps it on reload).
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Client keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        match &self.rate {
            Some(Rate::Client(r)) => r.len(),
            _ => 0,
        }
    }
}

/// A limiter that keeps client keys and drops those whose bucket is full again.
pub(crate) trait Evict: Send + Sync + 'static {
    fn evict_stale(&self);
}

impl Evict for Limiter {
    fn evict_stale(&self) {
        Limiter::evict_stale(self);
    }
}

/// Evicts every `EVICT_EVERY` for as long as the limiter lives (a reload
/// drops it).
pub(crate) fn spawn_eviction<L: Evict>(limiter: Weak<L>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVICT_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(l) = limiter.upgrade() else { return };
            l.evict_stale();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn config(per: RateLimitPer, rpm: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_minute: rpm,
            burst,
            per,
            client_key_header: HeaderName::from_static("authorization"),
            max_wait: Duration::ZERO,
            max_concurrent: 0,
        }
    }

    #[test]
    fn a_burst_then_one_cell_per_interval_on_a_fake_clock() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(&config(RateLimitPer::Route, 60, 3), clock.clone());
        assert!((0..3).all(|_| l.check(ANONYMOUS).is_ok()));
        let wait = l.check(ANONYMOUS).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        clock.advance(Duration::from_secs(1));
        assert!(l.check(ANONYMOUS).is_ok());
        assert!(l.check(ANONYMOUS).is_err());
    }

    #[test]
    fn client_keys_are_hashed_and_independent() {
        let l = Limiter::with_clock(
            &config(RateLimitPer::Client, 60, 1),
            FakeRelativeClock::default(),
        );
        let mut a = HeaderMap::new();
        a.insert("authorization", "Bearer a".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert("authorization", "Bearer b".parse().unwrap());
        let (ka, kb) = (l.client_key(&a), l.client_key(&b));
        assert_ne!(ka, kb);
        assert_ne!(ka, ANONYMOUS);
        assert_eq!(l.client_key(&HeaderMap::new()), ANONYMOUS);
        assert!(l.check(ka).is_ok() && l.check(kb).is_ok() && l.check(ANONYMOUS).is_ok());
        assert!(l.check(ka).is_err() && l.check(kb).is_err());
    }

    #[test]
    fn a_million_keys_are_evicted_once_their_buckets_refill() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(&config(RateLimitPer::Client, 600, 10), clock.clone());
        for key in 1..=1_000_000u64 {
            assert!(l.check(key).is_ok());
        }
        assert_eq!(l.tracked_keys(), 1_000_000);
        // One cell refills in 100 ms; a bucket that took one is full again then.
        clock.advance(Duration::from_millis(200));
        l.check(7).unwrap();
        l.evict_stale();
        assert_eq!(l.tracked_keys(), 1, "only the key used since stays");
    }
}
