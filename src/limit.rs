//! Admission per route: a GCRA rate limit (governor) for the whole route or
//! per client key, and a cap on requests in flight. Checked right after
//! routing, before the body is read, so a rejected request costs almost
//! nothing and never reaches the upstream.
//!
//! Limits are per sluice process (N replicas each enforce their own) unless
//! `shared = true` keeps the rate bucket in the store ([`crate::store`]);
//! the in-flight cap is always local.

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
use crate::store::Kind;

/// How often stale client keys are dropped.
pub(crate) const EVICT_EVERY: Duration = Duration::from_secs(30);
/// The bucket shared by requests without the client key header.
const ANONYMOUS: u64 = 0;

/// One route's limits.
pub struct Limiter<C: Clock = DefaultClock> {
    rate: Option<Rate<C>>,
    /// `shared = true`: the bucket in the store, and what to do without it.
    shared: Option<Shared<C>>,
    in_flight: Option<Arc<Semaphore>>,
    max_wait: Duration,
    key_header: HeaderName,
    /// Seeded per process: client keys are stored only as this hash. A
    /// shared bucket's keys are hashed alike on every replica (`None`).
    hasher: Option<RandomState>,
    requests_per_minute: u32,
    config: RateLimitConfig,
    clock: C,
}

/// A bucket kept in `[rate_limit_store]` (SPEC §11).
struct Shared<C: Clock> {
    store: Arc<crate::store::Store>,
    /// The route's name: the bucket's name in the store.
    name: String,
    on_error: crate::config::OnStoreError,
    /// `local-share`: a local bucket of limit / replicas, while the store is away.
    local: Option<Rate<C>>,
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
        Self::sharing(config, None)
    }

    /// A limiter whose bucket lives in `store` when the config says
    /// `shared`.
    pub fn sharing(config: &RateLimitConfig, store: Option<StoreLink>) -> Arc<Self> {
        let mut limiter = Self::with_clock(config, DefaultClock::default());
        // A shared limit needs a rate: the in-flight cap stays local.
        let shared = config.shared && config.requests_per_minute > 0;
        if let (true, Some(link)) = (shared, store) {
            let replicas = link.settings.replicas.max(1);
            let local = (link.settings.on_error == crate::config::OnStoreError::LocalShare)
                .then(|| {
                    let share = |n: u32| (n / replicas).max(1);
                    let rpm = NonZeroU32::new(share(config.requests_per_minute))?;
                    let burst = NonZeroU32::new(share(config.burst)).unwrap_or(NonZeroU32::MIN);
                    let q = Quota::per_minute(rpm).allow_burst(burst);
                    Some(match config.per {
                        RateLimitPer::Route => Rate::Route(RateLimiter::direct(q)),
                        RateLimitPer::Client => Rate::Client(RateLimiter::dashmap(q)),
                    })
                })
                .flatten();
            limiter.shared = Some(Shared {
                store: link.store,
                name: link.name,
                on_error: link.settings.on_error,
                local,
            });
            // Client keys must hash alike on every replica.
            limiter.hasher = None;
        }
        let limiter = Arc::new(limiter);
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
            shared: None,
            in_flight: (config.max_concurrent > 0)
                .then(|| Arc::new(Semaphore::new(config.max_concurrent as usize))),
            max_wait: config.max_wait,
            key_header: config.client_key_header.clone(),
            hasher: Some(RandomState::new()),
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
        if let Some(shared) = &self.shared {
            self.admit_shared(shared, key, give_up).await?;
            return Ok(slot);
        }
        while let Err(wait) = self.check(key) {
            if Instant::now() + wait > give_up {
                let limit = self.requests_per_minute;
                return Err(ProxyError::RateLimited { wait, limit });
            }
            tokio::time::sleep(wait).await;
        }
        Ok(slot)
    }

    /// A shared bucket: the store's verdict; without one (slow, away),
    /// `on_error`'s.
    async fn admit_shared(
        &self,
        shared: &Shared<C>,
        key: u64,
        give_up: Instant,
    ) -> Result<(), ProxyError> {
        let limit = self.requests_per_minute;
        let burst = u64::from(self.config.burst.max(1));
        loop {
            let verdict = shared
                .store
                .charge(
                    Kind::Requests,
                    &shared.name,
                    key,
                    u64::from(limit),
                    burst,
                    1,
                )
                .await;
            let wait = match verdict {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(refusal)) => refusal.wait,
                Err(_) => {
                    return match (shared.on_error, &shared.local) {
                        (crate::config::OnStoreError::Deny, _) => {
                            Err(ProxyError::RateLimitStoreUnavailable)
                        }
                        (crate::config::OnStoreError::LocalShare, Some(local)) => {
                            self.admit_local(local, key, give_up)
                        }
                        _ => Ok(()),
                    };
                }
            };
            if Instant::now() + wait > give_up {
                return Err(ProxyError::RateLimited { wait, limit });
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The local share while the store is away: one try, no wait (the
    /// store may be back for the next request).
    fn admit_local(&self, local: &Rate<C>, key: u64, _give_up: Instant) -> Result<(), ProxyError> {
        let outcome = match local {
            Rate::Route(r) => r.check(),
            Rate::Client(r) => r.check_key(&key),
        };
        outcome.map_err(|not_until| ProxyError::RateLimited {
            wait: not_until.wait_time_from(self.clock.now()),
            limit: self.requests_per_minute,
        })
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
            (Some(Rate::Client(_)), Some(v)) => match &self.hasher {
                Some(h) => h.hash_one(v.as_bytes()).max(1),
                // SipHash with fixed keys: the same on every replica.
                None => crate::store::key_hash(v.as_bytes()),
            },
            _ => ANONYMOUS,
        }
    }

    /// Drops client keys whose bucket is full again (indistinguishable from new).
    pub fn evict_stale(&self) {
        // The local share a shared limit falls back on keeps keys too.
        let local = self.shared.as_ref().and_then(|s| s.local.as_ref());
        for rate in [self.rate.as_ref(), local].into_iter().flatten() {
            if let Rate::Client(r) = rate {
                r.retain_recent();
                r.shrink_to_fit();
            }
        }
    }

    /// The settings it was built with (an unchanged route keeps it on reload).
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Client keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        let local = self.shared.as_ref().and_then(|s| s.local.as_ref());
        [self.rate.as_ref(), local]
            .into_iter()
            .flatten()
            .map(|rate| match rate {
                Rate::Client(r) => r.len(),
                Rate::Route(_) => 0,
            })
            .sum()
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

/// What a shared limiter needs of the store: the connection, the bucket's
/// name (the route's) and the settings.
pub struct StoreLink {
    pub store: Arc<crate::store::Store>,
    pub name: String,
    pub settings: crate::config::StoreSettings,
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
            shared: false,
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

    /// While the store is away, a shared per-client limit keeps keys in its
    /// local share: they are evicted like the others.
    #[tokio::test]
    async fn the_local_share_of_a_shared_limit_is_evicted_too() {
        use crate::config::{OnStoreError, StoreSettings};
        use crate::store::{Store, StoreConfig};
        let mut c = config(RateLimitPer::Client, 600_000, 10);
        c.shared = true;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://127.0.0.1:{port}/0");
        let store_config = StoreConfig {
            timeout: Duration::from_millis(20),
            ..StoreConfig::new(&url)
        };
        let settings = StoreSettings {
            url,
            password: None,
            key_prefix: "sluice".into(),
            timeout: store_config.timeout,
            on_error: OnStoreError::LocalShare,
            replicas: 1,
            cluster: false,
            nodes: Vec::new(),
            ca: None,
        };
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let store = Store::start(&store_config, metrics.store());
        let link = StoreLink {
            store,
            name: "r".into(),
            settings,
        };
        let l = Limiter::sharing(&c, Some(link));
        for i in 0..100 {
            let mut h = HeaderMap::new();
            h.insert("authorization", format!("Bearer {i}").parse().unwrap());
            l.admit(&h, None).await.unwrap();
        }
        assert_eq!(l.tracked_keys(), 100);
        // 10,000 a second: each bucket is full again within a millisecond.
        tokio::time::sleep(Duration::from_millis(5)).await;
        l.evict_stale();
        assert_eq!(l.tracked_keys(), 0);
    }
}
