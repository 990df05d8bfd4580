//! Passive health of one deployment (SPEC §9): only failures the upstream
//! caused count; enough of them in a row, or too large a share over a
//! window, eject it for `base_ejection × 2^(n-1)` up to `max_ejection`.
//! After that one real request probes it while the others skip it; a
//! success heals it, a failure ejects it again for longer. No synthetic
//! checks: a sidecar must not spend tokens on them. A new ejection never
//! shortens a running one.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::HealthConfig;

/// What an attempt at a deployment tells its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Any answer that is not the upstream's failure (a 2xx, a client's 4xx).
    Fine,
    /// Connect failure, reset, timeout, 5xx but 501, 429.
    Failed,
    /// A 429 that says how long to wait: ejected at once for that long.
    RateLimited(Duration),
    /// 401/403 or insufficient_quota for a key sluice injected.
    KeyRefused,
    /// Neither: the client went away, or sluice refused it itself.
    Ignored,
}

/// Why a deployment was ejected, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Failures,
    RateLimited,
    Auth,
    Probe,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failures => "failures",
            Self::RateLimited => "rate_limited",
            Self::Auth => "auth",
            Self::Probe => "probe_failed",
        }
    }
}

/// The state a deployment is in, as `sluice_deployment_state` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    Ejected,
    HalfOpen,
    /// Its rate limit is used up (`x-ratelimit-remaining-*: 0`) until the reset.
    Saturated,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Ejected => "ejected",
            Self::HalfOpen => "half_open",
            Self::Saturated => "saturated",
        }
    }
}

#[derive(Debug)]
pub struct Health {
    cfg: HealthConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    consecutive: u32,
    /// Ejections since it was last healthy.
    ejections: u32,
    /// Ejected until then.
    until: Option<Instant>,
    /// A probe is out since then.
    probing: Option<Instant>,
    /// One-second buckets over the window: (second, attempts, failures).
    buckets: Vec<(u64, u32, u32)>,
    /// The clock's origin for bucket numbers.
    origin: Instant,
    /// Its rate limit is used up until then: skipped, but not failed.
    saturated: Option<Instant>,
}

/// Whether a deployment may take an attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    /// Its ejection is over: this attempt is the one probe.
    Probe,
    Closed,
}

impl Health {
    pub fn new(cfg: HealthConfig) -> Self {
        let buckets = cfg.window.as_secs().max(1) as usize;
        Self {
            cfg,
            inner: Mutex::new(Inner {
                consecutive: 0,
                ejections: 0,
                until: None,
                probing: None,
                buckets: Vec::with_capacity(buckets),
                origin: Instant::now(),
                saturated: None,
            }),
        }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an attempt may go now, without taking the probe.
    pub fn access(&self, now: Instant) -> Access {
        self.access_of(&self.lock(), now)
    }

    fn access_of(&self, s: &Inner, now: Instant) -> Access {
        if s.saturated.is_some_and(|t| now < t) {
            return Access::Closed;
        }
        match s.until {
            None => Access::Open,
            Some(until) if now < until => Access::Closed,
            // A probe that never reported (its request was dropped) frees
            // the slot after one more ejection's length.
            Some(_) if s.probing.is_some_and(|p| now < p + self.cfg.max_ejection) => Access::Closed,
            Some(_) => Access::Probe,
        }
    }

    /// Takes the probe slot; false when another request took it first.
    pub fn take_probe(&self, now: Instant) -> bool {
        let mut s = self.lock();
        let free = s.until.is_some_and(|u| now >= u)
            && s.probing.is_none_or(|p| now >= p + self.cfg.max_ejection);
        if free {
            s.probing = Some(now);
        }
        free
    }

    /// When it can be tried again (now, if it can).
    pub fn ready_at(&self) -> Option<Instant> {
        let s = self.lock();
        s.until.max(s.saturated)
    }

    /// The upstream said its rate limit is used up until `until`: skipped
    /// until then, without counting as a failure.
    pub fn saturate(&self, until: Instant) {
        if self.cfg.honor_rate_limit_headers {
            let mut s = self.lock();
            s.saturated = Some(s.saturated.map_or(until, |t| t.max(until)));
        }
    }

    pub fn state(&self, now: Instant) -> State {
        let s = self.lock();
        if s.saturated.is_some_and(|t| now < t) {
            return State::Saturated;
        }
        match self.access_of(&s, now) {
            Access::Open => State::Healthy,
            Access::Probe => State::HalfOpen,
            Access::Closed if s.probing.is_some() => State::HalfOpen,
            Access::Closed => State::Ejected,
        }
    }

    /// Records an attempt's outcome; `Some` when it ejected the deployment.
    pub fn report(&self, r: Report, now: Instant) -> Option<Why> {
        let cfg = &self.cfg;
        let mut s = self.lock();
        let probed = s.until.is_some_and(|u| now >= u);
        let (failed, why, least) = match r {
            Report::Ignored => return None,
            Report::Fine => {
                s.count(now, cfg.window, false);
                s.consecutive = 0;
                if probed || s.until.is_none() {
                    // Healed.
                    s.until = None;
                    s.probing = None;
                    s.ejections = 0;
                }
                return None;
            }
            Report::Failed => (true, Why::Failures, None),
            Report::RateLimited(hint) => (true, Why::RateLimited, Some(hint.min(cfg.max_ejection))),
            Report::KeyRefused => (true, Why::Auth, Some(cfg.auth_ejection)),
        };
        debug_assert!(failed);
        s.count(now, cfg.window, true);
        s.consecutive += 1;
        let why = if probed && s.probing.is_some() {
            Why::Probe
        } else {
            why
        };
        let tripped = match why {
            Why::Probe => true,
            Why::RateLimited | Why::Auth => true,
            Why::Failures => {
                let (attempts, failures) = s.totals(now, cfg.window);
                s.consecutive >= cfg.consecutive_failures
                    || attempts >= cfg.min_requests
                        && f64::from(failures) > cfg.failure_ratio * f64::from(attempts)
            }
        };
        if !tripped {
            return None;
        }
        let length = match least {
            Some(d) if why != Why::Probe => d,
            _ => {
                let n = s.ejections.min(16);
                cfg.base_ejection
                    .saturating_mul(1 << n)
                    .min(cfg.max_ejection)
            }
        };
        s.ejections += 1;
        s.probing = None;
        s.consecutive = 0;
        let until = now + length;
        // Never shortened by a new, shorter one.
        s.until = Some(
            s.until
                .map_or(until, |u| if u > now { u.max(until) } else { until }),
        );
        Some(why)
    }
}

impl Inner {
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    fn count(&mut self, now: Instant, window: Duration, failed: bool) {
        let sec = self.second(now);
        let oldest = sec.saturating_sub(window.as_secs().max(1) - 1);
        self.buckets.retain(|b| b.0 >= oldest);
        match self.buckets.last_mut() {
            Some(b) if b.0 == sec => {
                b.1 += 1;
                b.2 += u32::from(failed);
            }
            _ => self.buckets.push((sec, 1, u32::from(failed))),
        }
    }

    fn totals(&self, now: Instant, window: Duration) -> (u32, u32) {
        let oldest = self.second(now).saturating_sub(window.as_secs().max(1) - 1);
        self.buckets
            .iter()
            .filter(|b| b.0 >= oldest)
            .fold((0, 0), |(a, f), b| (a + b.1, f + b.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            min_requests: 10,
            window: Duration::from_secs(30),
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(30),
            auth_ejection: Duration::from_secs(300),
            honor_rate_limit_headers: true,
        }
    }

    async fn advance(s: u64) {
        tokio::time::advance(Duration::from_secs(s)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_eject_then_one_probe_and_the_ejection_doubles_to_its_cap() {
        let h = Health::new(cfg());
        let now = Instant::now;
        for _ in 0..4 {
            assert_eq!(h.report(Report::Failed, now()), None);
        }
        // Client errors and disconnects never count.
        for r in [Report::Ignored, Report::Ignored] {
            assert_eq!(h.report(r, now()), None);
        }
        assert_eq!(h.access(now()), Access::Open);
        assert_eq!(h.report(Report::Failed, now()), Some(Why::Failures));
        assert_eq!(h.state(now()), State::Ejected);
        advance(9).await;
        assert_eq!(h.access(now()), Access::Closed);
        advance(1).await;
        // Ejected 10 s: one probe, the others skip it.
        assert_eq!(h.access(now()), Access::Probe);
        assert!(h.take_probe(now()));
        assert!(!h.take_probe(now()));
        assert_eq!(h.access(now()), Access::Closed);
        assert_eq!(h.state(now()), State::HalfOpen);
        // The probe fails: 20 s.
        assert_eq!(h.report(Report::Failed, now()), Some(Why::Probe));
        advance(19).await;
        assert_eq!(h.access(now()), Access::Closed);
        advance(1).await;
        assert!(h.take_probe(now()));
        assert_eq!(h.report(Report::Failed, now()), Some(Why::Probe));
        // Then the 30 s cap.
        advance(29).await;
        assert_eq!(h.access(now()), Access::Closed);
        advance(1).await;
        assert!(h.take_probe(now()));
        assert_eq!(h.report(Report::Failed, now()), Some(Why::Probe));
        advance(30).await;
        assert!(h.take_probe(now()));
        // A success heals it, and the next ejection starts at 10 s again.
        assert_eq!(h.report(Report::Fine, now()), None);
        assert_eq!(h.state(now()), State::Healthy);
        for _ in 0..5 {
            h.report(Report::Failed, now());
        }
        advance(10).await;
        assert_eq!(h.access(now()), Access::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_ratio_over_the_window_ejects_and_successes_reset_the_run() {
        let h = Health::new(cfg());
        let now = Instant::now;
        // Alternating: never 5 in a row, but 6 of 11 over the window.
        for i in 0..10 {
            let r = if i % 2 == 0 {
                Report::Failed
            } else {
                Report::Fine
            };
            assert_eq!(h.report(r, now()), None, "attempt {i}");
        }
        assert_eq!(h.report(Report::Failed, now()), Some(Why::Failures));
        // Old attempts leave the window.
        let h = Health::new(cfg());
        for _ in 0..4 {
            h.report(Report::Failed, now());
        }
        h.report(Report::Fine, now());
        advance(31).await;
        for _ in 0..4 {
            assert_eq!(h.report(Report::Failed, now()), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_used_up_rate_limit_saturates_until_its_reset_without_a_failure() {
        let h = Health::new(cfg());
        let now = Instant::now;
        h.saturate(now() + Duration::from_secs(6));
        assert_eq!(
            (h.access(now()), h.state(now())),
            (Access::Closed, State::Saturated)
        );
        advance(6).await;
        assert_eq!(
            (h.access(now()), h.state(now())),
            (Access::Open, State::Healthy)
        );
        // Off with honor_rate_limit_headers = false.
        let h = Health::new(HealthConfig {
            honor_rate_limit_headers: false,
            ..cfg()
        });
        h.saturate(now() + Duration::from_secs(6));
        assert_eq!(h.access(now()), Access::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn hints_and_refused_keys_eject_at_once_and_never_shorten_an_ejection() {
        let h = Health::new(cfg());
        let now = Instant::now;
        let hint = Report::RateLimited(Duration::from_secs(7));
        assert_eq!(h.report(hint, now()), Some(Why::RateLimited));
        advance(7).await;
        assert_eq!(h.access(now()), Access::Probe);
        // A hint over max_ejection is capped.
        let h = Health::new(cfg());
        h.report(Report::RateLimited(Duration::from_secs(600)), now());
        advance(30).await;
        assert_eq!(h.access(now()), Access::Probe);
        // A lost key: 5 minutes, and a later short hint does not shorten it.
        let h = Health::new(cfg());
        assert_eq!(h.report(Report::KeyRefused, now()), Some(Why::Auth));
        h.report(Report::RateLimited(Duration::from_secs(1)), now());
        advance(299).await;
        assert_eq!(h.access(now()), Access::Closed);
        advance(1).await;
        assert_eq!(h.access(now()), Access::Probe);
    }
}
