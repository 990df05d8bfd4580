//! Token-per-minute limits: a GCRA bucket counted in tokens, charged an
//! estimate at admission and settled with the actual count when the
//! response ends.
//!
//! governor's cells cannot be settled after the fact, so this is a GCRA cell
//! of our own on one `AtomicU64`: the theoretical arrival time (TAT), in
//! nanoseconds since a base instant. The bucket is full when TAT <= now; a
//! charge of n tokens moves TAT n token-times ahead; a request is admitted
//! while TAT stays within `burst` token-times of now. A debt (actual >
//! estimate) moves TAT further ahead, so later requests pay it; a refund
//! moves it back, never before now (never past a full bucket). A request
//! larger than the burst passes on a full bucket and leaves it in debt: it
//! waits for one rather than being refused for ever.
//!
//! Time is `tokio::time::Instant`, so tests run on the paused clock. Limits
//! are per sluice process, like [`crate::limit`]'s, unless `shared = true`
//! keeps the buckets in the store ([`crate::store`]): the same GCRA there,
//! charged by one script call at admission and settled by another, off the
//! response's path, when the response ends.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use crate::config::{OnStoreError, RateLimitPer, TokenLimitConfig};
use crate::error::ProxyError;
use crate::limit::{spawn_eviction, Evict, StoreLink};
use crate::store::{Kind, Store};

/// The bucket shared by requests without the client key header.
const ANONYMOUS: u64 = 0;
/// Nanoseconds per minute: n tokens take n * this / tokens_per_minute ns.
const NS_PER_MINUTE: u128 = 60_000_000_000;

/// Why a charge does not fit now: the figures of the 429's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokensRefused {
    /// Until this request could pass (`retry-after`).
    pub wait: Duration,
    /// `x-ratelimit-limit-tokens`: tokens per minute.
    pub limit: u64,
    /// `x-ratelimit-remaining-tokens`: tokens available now.
    pub remaining: u64,
    /// `x-ratelimit-reset-tokens`: until the bucket is full.
    pub reset: Duration,
}

/// One token bucket. A route, a client key or a model deployment has one;
/// it settles by itself, so a [`Charge`] needs nothing else.
#[derive(Debug)]
pub struct Cell {
    /// Theoretical arrival time, ns since `base`: the bucket is full from then.
    tat: AtomicU64,
    tokens_per_minute: u64,
    burst: u64,
    /// `burst` tokens in ns: how far ahead of now TAT may go.
    burst_ns: u64,
    base: Instant,
}

impl Cell {
    /// A full bucket. `base` is any instant no later than the first `now`
    /// it will be given. A `tokens_per_minute` of 0 counts as 1 (the config
    /// refuses it); a `burst` of 0 admits one request per full bucket.
    pub fn new(tokens_per_minute: u64, burst: u64, base: Instant) -> Self {
        let tokens_per_minute = tokens_per_minute.max(1);
        let cell = Self {
            tat: AtomicU64::new(0),
            tokens_per_minute,
            burst,
            burst_ns: 0,
            base,
        };
        Self {
            burst_ns: cell.ns(burst),
            ..cell
        }
    }

    /// Charges `cost` tokens if they fit at `now`, or says when they will.
    pub fn try_charge(&self, cost: u64, now: Instant) -> Result<(), TokensRefused> {
        let cost_ns = self.ns(cost);
        let now = self.since_base(now);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let ahead = tat.saturating_sub(now);
            // A full bucket (ahead == 0) admits any cost, even over the burst.
            if ahead > 0 && ahead.saturating_add(cost_ns) > self.burst_ns {
                return Err(self.refusal(ahead, cost_ns));
            }
            let new = tat.max(now).saturating_add(cost_ns);
            match self.tat.compare_exchange_weak(tat, new, Relaxed, Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Charges `cost` tokens as [`Cell::try_charge`] does, with the charge
    /// to settle later.
    pub fn charge(self: &Arc<Self>, cost: u64, now: Instant) -> Result<Charge, TokensRefused> {
        self.try_charge(cost, now)?;
        Ok(Charge {
            to: Bucket::Local(self.clone()),
            charged: cost,
        })
    }

    /// The rate it was made with.
    pub fn tokens_per_minute(&self) -> u64 {
        self.tokens_per_minute
    }

    /// Whether `cost` tokens would fit at `now` (charges nothing).
    pub fn has_room(&self, cost: u64, now: Instant) -> bool {
        let ahead = self.ahead(now);
        ahead == 0 || ahead.saturating_add(self.ns(cost)) <= self.burst_ns
    }

    /// Corrects a charge of `estimate` to `actual` tokens. A debt is added to
    /// TAT as it stands, as if the estimate had been right: later requests
    /// pay it, less any time the bucket has been full since (a long stream
    /// spent its tokens over that time). A refund never takes the bucket
    /// past full, so it cannot swallow a debt settled after it.
    pub fn settle(&self, estimate: u64, actual: u64, now: Instant) {
        let (charged, used) = (self.ns(estimate), self.ns(actual));
        if used > charged {
            let debt = used - charged;
            let add = |tat: u64| Some(tat.saturating_add(debt));
            let _ = self.tat.fetch_update(Relaxed, Relaxed, add);
        } else if charged > used {
            let (refund, now) = (charged - used, self.since_base(now));
            let give_back = |tat: u64| (tat > now).then(|| tat.saturating_sub(refund).max(now));
            let _ = self.tat.fetch_update(Relaxed, Relaxed, give_back);
        }
    }

    /// Tokens available at `now`: 0 while in debt, `burst` when full.
    pub fn remaining(&self, now: Instant) -> u64 {
        self.remaining_when(self.ahead(now))
    }

    /// Until the bucket is full again.
    pub fn reset(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.ahead(now))
    }

    fn refusal(&self, ahead: u64, cost_ns: u64) -> TokensRefused {
        TokensRefused {
            // Until TAT is close enough to admit it, or the bucket is full.
            wait: Duration::from_nanos(ahead - self.burst_ns.saturating_sub(cost_ns)),
            limit: self.tokens_per_minute,
            remaining: self.remaining_when(ahead),
            reset: Duration::from_nanos(ahead),
        }
    }

    fn remaining_when(&self, ahead: u64) -> u64 {
        remaining(self.burst, self.tokens_per_minute, ahead)
    }

    /// How far TAT is ahead of `now`, in ns; 0 when the bucket is full.
    fn ahead(&self, now: Instant) -> u64 {
        self.tat.load(Relaxed).saturating_sub(self.since_base(now))
    }

    /// `tokens` in ns, rounded down (k charges of n/k never cost more than
    /// one of n), in u128 so no rate overflows or drifts.
    fn ns(&self, tokens: u64) -> u64 {
        let ns = u128::from(tokens) * NS_PER_MINUTE / u128::from(self.tokens_per_minute);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    fn since_base(&self, now: Instant) -> u64 {
        let ns = now.saturating_duration_since(self.base).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// Tokens of a bucket `ahead` ns from full: 0 while in debt, `burst` when
/// full. The tokens TAT is ahead by are rounded up: a part-token is not
/// available.
fn remaining(burst: u64, tokens_per_minute: u64, ahead: u64) -> u64 {
    if ahead == 0 {
        return burst;
    }
    let used = (u128::from(ahead) * u128::from(tokens_per_minute)).div_ceil(NS_PER_MINUTE);
    burst.saturating_sub(u64::try_from(used).unwrap_or(u64::MAX))
}

/// An admitted request's estimate, to settle when the response ends.
/// Dropped unsettled, the estimate stands.
#[derive(Debug)]
#[must_use = "settle it with the actual count when the response ends"]
pub struct Charge {
    to: Bucket,
    charged: u64,
}

/// Where a charge was made.
#[derive(Debug)]
enum Bucket {
    Local(Arc<Cell>),
    /// In the store, for the client key's hash.
    Shared(Arc<SharedBucket>, u64),
    /// Admitted without a charge (`on_error = "allow"`).
    Nothing,
}

impl Charge {
    /// The estimate charged at admission.
    pub fn charged(&self) -> u64 {
        self.charged
    }

    /// Settles with the tokens the response used: 0 after an upstream
    /// error, which refunds the estimate.
    pub fn settle(self, actual: u64) {
        self.settle_at(actual, Instant::now());
    }

    /// [`Charge::settle`] with the clock already read (the request's end).
    pub fn settle_at(self, actual: u64, now: Instant) {
        if actual == self.charged {
            return;
        }
        match self.to {
            Bucket::Local(cell) => cell.settle(self.charged, actual, now),
            // Off the response's path: the client is not kept waiting for
            // Redis, and a store away loses only this correction.
            Bucket::Shared(bucket, key) => {
                let delta = i128::from(actual) - i128::from(self.charged);
                // Saturated by sign: a huge refund stays a refund.
                let delta = delta.clamp(i64::MIN.into(), i64::MAX.into()) as i64;
                tokio::spawn(async move {
                    let b = &bucket;
                    let _ = b
                        .store
                        .settle(Kind::Tokens, &b.name, key, b.tpm, delta)
                        .await;
                });
            }
            Bucket::Nothing => {}
        }
    }
}

/// One route's token limit: one bucket, or one per client key.
pub struct TokenLimiter {
    /// The buckets; for a shared limit, the local share used while the
    /// store is away (limit / replicas).
    cells: Cells,
    /// `shared = true`: the buckets in the store.
    shared: Option<Arc<SharedBucket>>,
    key_header: HeaderName,
    /// Seeded per process: client keys are stored only as this hash. A
    /// shared limit's keys are hashed alike on every replica (`None`).
    hasher: Option<RandomState>,
    /// A shared limit's local share keys its map by the replica-wide hash
    /// mixed with this per-process seed (a client can compute the former).
    mix: RandomState,
    config: TokenLimitConfig,
    /// The local cells' rate and burst.
    local: (u64, u64),
    /// Every cell's base: when the limiter was made.
    base: Instant,
}

/// A token bucket kept in `[rate_limit_store]` (SPEC §11).
#[derive(Debug)]
pub struct SharedBucket {
    store: Arc<Store>,
    /// The route's name.
    name: String,
    tpm: u64,
    burst: u64,
    on_error: OnStoreError,
}

enum Cells {
    Route(Arc<Cell>),
    Client(Mutex<HashMap<u64, Arc<Cell>, BuildHasherDefault<Prehashed>>>),
}

/// The map's keys are already hashes, seeded per process (so a client
/// cannot pick them to collide): they are used as they are.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl std::fmt::Debug for TokenLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLimiter")
            .field("tokens_per_minute", &self.config.tokens_per_minute)
            .field("burst", &self.config.burst)
            .field("per", &self.config.per)
            .field("max_wait", &self.config.max_wait)
            .finish_non_exhaustive()
    }
}

impl TokenLimiter {
    /// A limiter, with its eviction task when it is per client (so it needs
    /// a runtime then).
    pub fn new(config: &TokenLimitConfig) -> Arc<Self> {
        Self::sharing(config, None)
    }

    /// A limiter whose buckets live in `link`'s store when the config says
    /// `shared`.
    pub fn sharing(config: &TokenLimitConfig, link: Option<StoreLink>) -> Arc<Self> {
        let mut limiter = Self::without_eviction(config);
        if let (true, Some(link)) = (config.shared, link) {
            let replicas = u64::from(link.settings.replicas.max(1));
            limiter.local = (
                (config.tokens_per_minute / replicas).max(1),
                (config.burst / replicas).max(1),
            );
            if let Cells::Route(_) = limiter.cells {
                limiter.cells = Cells::Route(Arc::new(limiter.new_cell()));
            }
            limiter.shared = Some(Arc::new(SharedBucket {
                store: link.store,
                name: link.name,
                tpm: config.tokens_per_minute,
                burst: config.burst,
                on_error: link.settings.on_error,
            }));
            limiter.hasher = None;
        }
        let limiter = Arc::new(limiter);
        if matches!(limiter.cells, Cells::Client(_)) {
            spawn_eviction(Arc::downgrade(&limiter));
        }
        limiter
    }

    /// A limiter without the eviction task: for tests and benches, or a
    /// caller that calls [`TokenLimiter::evict_stale`] itself.
    pub fn without_eviction(config: &TokenLimitConfig) -> Self {
        let base = Instant::now();
        let cells = match config.per {
            RateLimitPer::Route => Cells::Route(Arc::new(Cell::new(
                config.tokens_per_minute,
                config.burst,
                base,
            ))),
            RateLimitPer::Client => Cells::Client(Mutex::default()),
        };
        Self {
            cells,
            shared: None,
            key_header: config.client_key_header.clone(),
            hasher: Some(RandomState::new()),
            mix: RandomState::new(),
            config: config.clone(),
            local: (config.tokens_per_minute, config.burst),
            base,
        }
    }

    /// Charges `cost` tokens to `key`'s bucket, in the store when the limit
    /// is shared (and as `on_error` says without it). Waits up to
    /// `max_wait` (and never past `deadline`) for them to fit; the charge
    /// must be settled when the response ends.
    pub async fn admit(
        &self,
        key: u64,
        cost: u64,
        deadline: Option<Instant>,
    ) -> Result<Charge, ProxyError> {
        let Some(shared) = &self.shared else {
            let refused = self.admit_local(key, cost, deadline).await;
            return refused.map_err(ProxyError::TokensLimited);
        };
        let give_up = Instant::now() + self.config.max_wait;
        let give_up = deadline.map_or(give_up, |d| d.min(give_up));
        let b = &**shared;
        loop {
            let verdict = b
                .store
                .charge(Kind::Tokens, &b.name, key, b.tpm, b.burst, cost)
                .await;
            let refusal = match verdict {
                Ok(Ok(_)) => {
                    return Ok(Charge {
                        to: Bucket::Shared(shared.clone(), key),
                        charged: cost,
                    })
                }
                Ok(Err(r)) => r,
                Err(_) => {
                    return match b.on_error {
                        OnStoreError::Deny => Err(ProxyError::RateLimitStoreUnavailable),
                        OnStoreError::Allow => Ok(Charge {
                            to: Bucket::Nothing,
                            charged: cost,
                        }),
                        // One try: the store may be back for the next request.
                        OnStoreError::LocalShare => {
                            self.check(key, cost).map_err(ProxyError::TokensLimited)
                        }
                    };
                }
            };
            if Instant::now() + refusal.wait > give_up {
                let ahead = u64::try_from(refusal.ahead.as_nanos()).unwrap_or(u64::MAX);
                return Err(ProxyError::TokensLimited(TokensRefused {
                    wait: refusal.wait,
                    limit: b.tpm,
                    remaining: remaining(b.burst, b.tpm, ahead),
                    reset: refusal.ahead,
                }));
            }
            tokio::time::sleep(refusal.wait).await;
        }
    }

    /// Charges `cost` tokens to `key`'s local bucket. Waits up to
    /// `max_wait` (and never past `deadline`) for them to fit; the charge
    /// must be settled when the response ends.
    pub async fn admit_local(
        &self,
        key: u64,
        cost: u64,
        deadline: Option<Instant>,
    ) -> Result<Charge, TokensRefused> {
        let give_up = Instant::now() + self.config.max_wait;
        let give_up = deadline.map_or(give_up, |d| d.min(give_up));
        loop {
            match self.check(key, cost) {
                Ok(charge) => return Ok(charge),
                Err(refused) if Instant::now() + refused.wait > give_up => return Err(refused),
                // Another request may take the room first: try again then.
                Err(refused) => tokio::time::sleep(refused.wait).await,
            }
        }
    }

    /// One try at charging `cost` tokens to `key`'s bucket, now.
    pub fn check(&self, key: u64, cost: u64) -> Result<Charge, TokensRefused> {
        self.check_at(key, cost, Instant::now())
    }

    /// [`TokenLimiter::check`] with the clock already read.
    pub fn check_at(&self, key: u64, cost: u64, now: Instant) -> Result<Charge, TokensRefused> {
        let cell = match &self.cells {
            Cells::Route(cell) => cell.clone(),
            Cells::Client(map) => lock(map)
                .entry(match self.hasher {
                    Some(_) => key,
                    None => self.mix.hash_one(key),
                })
                .or_insert_with(|| Arc::new(self.new_cell()))
                .clone(),
        };
        cell.try_charge(cost, now)?;
        Ok(Charge {
            to: Bucket::Local(cell),
            charged: cost,
        })
    }

    /// The hash of the client key header's value; never the value itself.
    pub fn client_key(&self, headers: &HeaderMap) -> u64 {
        match (&self.cells, headers.get(&self.key_header)) {
            (Cells::Client(_), Some(v)) => match &self.hasher {
                Some(h) => h.hash_one(v.as_bytes()).max(1),
                None => crate::store::key_hash(v.as_bytes()),
            },
            _ => ANONYMOUS,
        }
    }

    /// Drops client keys whose bucket is full again (indistinguishable from
    /// new), unless a charge on it is still to be settled: its debt must
    /// land on the bucket the client keeps using.
    pub fn evict_stale(&self) {
        if let Cells::Client(map) = &self.cells {
            let now = Instant::now();
            let mut map = lock(map);
            // Under the lock no charge can be made: a count of 1 stays 1.
            map.retain(|_, cell| Arc::strong_count(cell) > 1 || cell.ahead(now) > 0);
            if map.len() * 4 < map.capacity() {
                map.shrink_to_fit();
            }
        }
    }

    /// The settings it was built with (an unchanged route keeps it on reload).
    pub fn config(&self) -> &TokenLimitConfig {
        &self.config
    }

    /// Client keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        match &self.cells {
            Cells::Client(map) => lock(map).len(),
            Cells::Route(_) => 0,
        }
    }

    fn new_cell(&self) -> Cell {
        Cell::new(self.local.0, self.local.1, self.base)
    }
}

/// Nothing panics while holding it; a poisoned map is still a good map.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Evict for TokenLimiter {
    fn evict_stale(&self) {
        TokenLimiter::evict_stale(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::EVICT_EVERY;
    use std::sync::atomic::AtomicBool;

    const MS: Duration = Duration::from_millis(1);
    /// 60,000 tokens per minute: one token per millisecond.
    const TPM: u64 = 60_000;

    fn config(per: RateLimitPer, burst: u64, max_wait: Duration) -> TokenLimitConfig {
        TokenLimitConfig {
            tokens_per_minute: TPM,
            burst,
            per,
            client_key_header: HeaderName::from_static("authorization"),
            max_wait,
            estimate: crate::config::Estimate::default(),
            shared: false,
        }
    }

    fn route(burst: u64, max_wait: Duration) -> TokenLimiter {
        TokenLimiter::without_eviction(&config(RateLimitPer::Route, burst, max_wait))
    }

    /// How long `admit` waits on the paused clock.
    async fn admit_wait(l: &TokenLimiter, cost: u64) -> (Charge, Duration) {
        let start = Instant::now();
        let charge = l.admit_local(ANONYMOUS, cost, None).await.unwrap();
        (charge, start.elapsed())
    }

    fn near(d: Duration, ms: u32) -> bool {
        d.abs_diff(ms * MS) <= MS
    }

    #[tokio::test(start_paused = true)]
    async fn a_debt_is_paid_by_the_next_request() {
        async fn next_waits_after(actual: u64) -> Duration {
            let l = route(1_000, Duration::from_secs(60));
            l.check(ANONYMOUS, 1_000).unwrap().settle(actual);
            admit_wait(&l, 1_000).await.1
        }
        let exact = next_waits_after(1_000).await;
        let under = next_waits_after(3_000).await;
        assert!(near(exact, 1_000), "{exact:?}");
        assert!(near(under, 3_000), "2,000 tokens more to pay: {under:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_fills_the_bucket_but_never_past_full() {
        let l = route(1_000, Duration::ZERO);
        // Over the burst: passes on the full bucket, 5 s ahead.
        let big = l.check(ANONYMOUS, 5_000).unwrap();
        tokio::time::sleep(4_950 * MS).await;
        // 50 ms ahead; this one takes it to the burst.
        let small = l.check(ANONYMOUS, 950).unwrap();
        assert_eq!(l.check(ANONYMOUS, 1).unwrap_err().remaining, 0);
        // 4,900 tokens back: more than the bucket is missing.
        big.settle(100);
        let Cells::Route(cell) = &l.cells else {
            unreachable!()
        };
        let now = Instant::now();
        assert_eq!(cell.remaining(now), 1_000);
        assert_eq!(cell.reset(now), Duration::ZERO);
        // Full, not more: a debt settled now is owed in full (TAT left in
        // the past would absorb it).
        small.settle(2_950);
        let refused = l.check(ANONYMOUS, 1).unwrap_err();
        assert_eq!(refused.reset, 2_000 * MS, "{refused:?}");
        assert_eq!(refused.wait, 1_001 * MS, "{refused:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_refunds_the_estimate_but_never_past_full() {
        let l = route(1_000, Duration::ZERO);
        let a = l.check(ANONYMOUS, 300).unwrap();
        let b = l.check(ANONYMOUS, 300).unwrap();
        assert_eq!(l.check(ANONYMOUS, 401).unwrap_err().remaining, 400);
        b.settle(0);
        assert_eq!(l.check(ANONYMOUS, 701).unwrap_err().remaining, 700);
        let b = l.check(ANONYMOUS, 300).unwrap();
        // 500 ms later 100 tokens are out; a's 300 back would be 200 past full.
        tokio::time::sleep(500 * MS).await;
        assert_eq!(l.check(ANONYMOUS, 901).unwrap_err().remaining, 900);
        a.settle(0);
        let half = l.check(ANONYMOUS, 501).unwrap();
        let refused = l.check(ANONYMOUS, 501).unwrap_err();
        assert_eq!(refused.remaining, 499);
        half.settle(0);
        // b used 1,000 more than its estimate: all of it is owed.
        b.settle(1_300);
        let refused = l.check(ANONYMOUS, 1).unwrap_err();
        assert_eq!((refused.remaining, refused.reset), (0, 1_000 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn an_estimate_over_the_burst_passes_then_the_next_pays_its_debt() {
        let l = route(1_000, Duration::from_secs(60));
        let (big, waited) = admit_wait(&l, 5_000).await;
        assert_eq!(waited, Duration::ZERO, "a full bucket admits any size");
        assert_eq!(big.charged(), 5_000);
        // 5 s ahead: one token fits once TAT is within the burst of now.
        let (_one, waited) = admit_wait(&l, 1).await;
        assert!(near(waited, 4_001), "{waited:?}");
        // Another oversized one waits for the bucket to be full again.
        let (_big2, waited) = admit_wait(&l, 2_000).await;
        assert!(near(waited, 1_000), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_holds_its_burst_and_no_more() {
        let l = route(1_000, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(10)).await;
        for _ in 0..4 {
            let _ = l.check(ANONYMOUS, 250).unwrap();
        }
        let refused = l.check(ANONYMOUS, 1).unwrap_err();
        assert_eq!((refused.remaining, refused.reset), (0, 1_000 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_figures() {
        let l = route(1_000, Duration::ZERO);
        let _a = l.check(ANONYMOUS, 600).unwrap();
        let refused = l.check(ANONYMOUS, 500).unwrap_err();
        assert_eq!(
            refused,
            TokensRefused {
                // 100 tokens short: 100 ms.
                wait: 100 * MS,
                limit: TPM,
                remaining: 400,
                reset: 600 * MS,
            }
        );
        // Oversized: until the bucket is full.
        let refused = l.check(ANONYMOUS, 5_000).unwrap_err();
        assert_eq!((refused.wait, refused.reset), (600 * MS, 600 * MS));
        // A part-token is not available.
        // (advance, not sleep: the timer rounds up to whole milliseconds.)
        tokio::time::advance(Duration::from_micros(100_500)).await;
        assert_eq!(l.check(ANONYMOUS, 501).unwrap_err().remaining, 500);
        let _b = l.check(ANONYMOUS, 500).unwrap();
        // In debt: nothing remains, and even a zero-cost request waits.
        let Cells::Route(cell) = &l.cells else {
            unreachable!()
        };
        cell.settle(0, 500, Instant::now());
        let refused = l.check(ANONYMOUS, 0).unwrap_err();
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset, Duration::from_micros(1_499_500));
        assert_eq!(refused.wait, refused.reset - 1_000 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn max_wait_and_the_deadline_bound_the_wait() {
        let l = route(1_000, 300 * MS);
        let _a = l.check(ANONYMOUS, 1_000).unwrap();
        let refused = l.admit_local(ANONYMOUS, 400, None).await.unwrap_err();
        assert_eq!(refused.wait, 400 * MS);
        assert_eq!(Instant::now(), l.base, "refused without waiting");
        let deadline = Some(Instant::now() + 199 * MS);
        l.admit_local(ANONYMOUS, 200, deadline).await.unwrap_err();
        let (_b, waited) = admit_wait(&l, 300).await;
        assert_eq!(waited, 300 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn client_keys_are_hashed_and_independent() {
        let l = TokenLimiter::without_eviction(&config(RateLimitPer::Client, 1_000, MS));
        let mut a = HeaderMap::new();
        a.insert("authorization", "Bearer a".parse().unwrap());
        let mut b = HeaderMap::new();
        b.insert("authorization", "Bearer b".parse().unwrap());
        let (ka, kb) = (l.client_key(&a), l.client_key(&b));
        assert_ne!(ka, kb);
        assert_ne!(ka, ANONYMOUS);
        assert_eq!(l.client_key(&a), ka, "the same header, the same key");
        assert_eq!(l.client_key(&HeaderMap::new()), ANONYMOUS);
        let other = TokenLimiter::without_eviction(&config(RateLimitPer::Client, 1_000, MS));
        assert_ne!(other.client_key(&a), ka, "seeded per limiter");
        for key in [ka, kb, ANONYMOUS] {
            let _ = l.check(key, 1_000).unwrap();
        }
        assert!(l.check(ka, 1).is_err() && l.check(kb, 1).is_err());
        assert_eq!(l.tracked_keys(), 3);
        // Per route, the header is not even read.
        assert_eq!(route(1_000, MS).client_key(&a), ANONYMOUS);
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_drops_full_buckets_but_keeps_one_owed_a_settlement() {
        let l = TokenLimiter::new(&config(RateLimitPer::Client, 1_000, Duration::ZERO));
        for key in 1..=1_000 {
            let _ = l.check(key, 500).unwrap();
        }
        let held = l.check(1_001, 500).unwrap();
        assert_eq!(l.tracked_keys(), 1_001);
        // Every bucket is full after 500 ms; the task runs at 30 s.
        tokio::time::sleep(EVICT_EVERY + MS).await;
        assert_eq!(l.tracked_keys(), 1, "only the key owed a settlement stays");
        // The debt lands on the bucket the client still uses: 40 s in all.
        held.settle(40_000);
        let refused = l.check(1_001, 1).unwrap_err();
        assert_eq!(refused.reset, 9_999 * MS);
        // Not full: kept, with no charge outstanding.
        l.evict_stale();
        assert_eq!(l.tracked_keys(), 1);
        tokio::time::sleep(9_999 * MS).await;
        l.evict_stale();
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn threads_never_admit_more_than_burst_plus_elapsed_times_rate() {
        const THREADS: u64 = 8;
        const TRIES: u64 = 50_000;
        /// Each try moves the shared clock on by this: 4 s in all.
        const STEP_NS: u64 = 10_000;
        let base = Instant::now();
        let cell = Cell::new(TPM, 1_000, base);
        let clock = AtomicU64::new(0);
        let go = AtomicBool::new(false);
        let admitted: u64 = std::thread::scope(|s| {
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (cell, clock, go) = (&cell, &clock, &go);
                    s.spawn(move || {
                        let mut rng = fastrand::Rng::with_seed(t);
                        while !go.load(Relaxed) {
                            std::hint::spin_loop();
                        }
                        let mut sum = 0;
                        for _ in 0..TRIES {
                            let now =
                                base + Duration::from_nanos(clock.fetch_add(STEP_NS, Relaxed));
                            let cost = rng.u64(1..=50);
                            if cell.try_charge(cost, now).is_ok() {
                                sum += cost;
                            }
                        }
                        sum
                    })
                })
                .collect();
            go.store(true, Relaxed);
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        let elapsed_tokens = clock.load(Relaxed) / 1_000_000;
        let bound = 1_000 + elapsed_tokens;
        assert!(admitted <= bound, "{admitted} > {bound}");
        // And it does admit: demand is far above the rate.
        assert!(admitted + 100 >= bound, "only {admitted} of {bound}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_waiting_tasks_never_exceed_burst_plus_elapsed_times_rate() {
        let l = Arc::new(route(1_000, Duration::from_secs(600)));
        let start = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..100u64)
            .map(|i| {
                let (l, log) = (l.clone(), log.clone());
                tokio::spawn(async move {
                    let cost = 100 + (i * 37) % 900;
                    let _charge = l.admit_local(ANONYMOUS, cost, None).await.unwrap();
                    log.lock().unwrap().push((Instant::now(), cost));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 100);
        log.sort();
        let mut sum = 0;
        for (at, cost) in &log {
            sum += cost;
            let elapsed_tokens = (*at - start).as_millis() as u64;
            assert!(
                sum <= 1_000 + elapsed_tokens,
                "{sum} by {elapsed_tokens} ms"
            );
        }
        // Nor did they wait much longer than the rate makes them: the
        // burst's worth less one request, and a millisecond each at most.
        let last = (log[99].0 - start).as_millis() as u64;
        assert!(last <= sum + 100, "last at {last} ms for {sum} tokens");
    }

    #[test]
    fn a_large_rate_neither_overflows_nor_drifts() {
        let base = Instant::now();
        let cell = Cell::new(u64::MAX, u64::MAX / 6, base);
        assert!(cell.try_charge(u64::MAX, base).is_ok());
        let cell = Cell::new(7, 2, base);
        // 7 a minute: one token every 8.57 s; two singles fit a burst of 2.
        assert!(cell.try_charge(1, base).is_ok() && cell.try_charge(1, base).is_ok());
        let refused = cell.try_charge(1, base).unwrap_err();
        assert_eq!(refused.wait.as_millis(), 8_571, "{refused:?}");
        assert!(cell.has_room(1, base + refused.wait));
        assert!(!cell.has_room(1, base + refused.wait - Duration::from_nanos(1)));
    }
}
