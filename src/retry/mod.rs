//! Retry decisions, as pure functions of an attempt's outcome, the policy
//! and the time: which outcomes are retried, how long to wait (full-jitter
//! backoff and the upstream's hint), and the per-route retry budget
//! (`budget.rs`). The proxy's attempt loop asks [`verdict`] after each
//! attempt.

mod budget;

use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

pub use budget::Budget;

use crate::config::RetryPolicy;
use crate::error::ProxyError;

/// What an attempt came to, as the retry policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived.
    Response {
        status: StatusCode,
        /// How long the upstream asked to wait (read only when the status
        /// is retryable and the route honours hints).
        hint: Option<Duration>,
        /// A 429 whose body says the account is out of quota.
        quota: bool,
    },
    /// No response: connect failure, reset, timeout, a broken request body.
    Failed(ProxyError),
    /// A 2xx SSE response held until its first event (`commit =
    /// "first-event"`), and that event is an error object.
    StreamError,
}

/// What the loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This outcome is the request's: pass it on.
    Return,
    /// Try again after this wait.
    RetryAfter(Duration),
}

impl Outcome {
    /// The attempt as a fixed word for metric labels: a status class, or
    /// why there was no response.
    pub fn label(self) -> &'static str {
        match self {
            Self::Response { status, .. } => status_class(status.as_u16()),
            Self::Failed(e) => failure_word(e),
            Self::StreamError => "stream_error",
        }
    }

    /// Why a retry follows this outcome, as a metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Response { status, .. } if status == StatusCode::TOO_MANY_REQUESTS => {
                "status_429"
            }
            Self::Response { status, .. } if status.is_server_error() => "status_5xx",
            Self::Response { .. } => "status_4xx",
            Self::Failed(e) => failure_word(e),
            Self::StreamError => "stream_error",
        }
    }
}

/// Whether attempt `attempt` (from 1) of at most `max` is retried, and
/// after how long. A retry needs an outcome the route lists, no quota
/// exhaustion, a hint within `max_retry_after`, and a wait that ends before
/// the `total` deadline.
pub fn verdict(
    policy: &RetryPolicy,
    outcome: Outcome,
    attempt: u32,
    max: u32,
    now: Instant,
    total: Option<Instant>,
    rng: &mut fastrand::Rng,
) -> Verdict {
    if attempt >= max {
        return Verdict::Return;
    }
    let hint = match outcome {
        Outcome::Response {
            status,
            hint,
            quota,
        } => {
            if quota || !policy.retry_on.statuses.contains(&status.as_u16()) {
                return Verdict::Return;
            }
            // A longer wait than the route allows: this response is the answer.
            if hint.is_some_and(|h| h > policy.max_retry_after) {
                return Verdict::Return;
            }
            hint
        }
        Outcome::Failed(e) if retryable(e, policy) => None,
        Outcome::StreamError if policy.retry_on.stream_error => None,
        Outcome::Failed(_) | Outcome::StreamError => return Verdict::Return,
    };
    let backoff = backoff(policy.backoff_base, policy.backoff_max, attempt - 1, rng);
    let wait = backoff.max(hint.unwrap_or(Duration::ZERO));
    if total.is_some_and(|d| now + wait >= d) {
        return Verdict::Return;
    }
    Verdict::RetryAfter(wait)
}

/// Where a request with a model plan stands after an attempt.
#[derive(Debug, Clone, Copy)]
pub struct PlanState {
    /// Its current model has attempts left.
    pub model_attempts_left: bool,
    /// Its current model has a deployment not yet tried in this request.
    pub untried_left: bool,
    /// Its chain has a next model.
    pub has_fallback: bool,
    /// The attempt went with a key sluice injected.
    pub injected_key: bool,
}

/// What a model plan does next (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStep {
    /// This outcome is the request's.
    Return,
    /// Again on the same model, after this wait.
    SameModel(Duration),
    /// On to the next model of the chain, at once.
    Fallback,
}

/// The plan's step after the route's verdict `v` on `outcome`. A retry
/// stays on the model while it has attempts, with no wait before a
/// deployment not yet tried; a lost key or quota moves at once to another
/// deployment, never the same; otherwise `fallback_on` moves down the
/// chain, at once, before the `total` deadline.
pub fn steer(
    policy: &RetryPolicy,
    v: Verdict,
    outcome: Outcome,
    plan: PlanState,
    now: Instant,
    total: Option<Instant>,
) -> PlanStep {
    let key_lost = match outcome {
        Outcome::Response { status, quota, .. } => {
            quota || plan.injected_key && matches!(status.as_u16(), 401 | 403)
        }
        Outcome::Failed(_) | Outcome::StreamError => false,
    };
    let past = total.is_some_and(|d| now >= d);
    if plan.model_attempts_left {
        // Another deployment, at once: a hint (even one too long to wait
        // for) and a lost key are the tried deployment's own.
        let retryable = key_lost || policy.retry_on.matches(outcome, plan.injected_key);
        if plan.untried_left && retryable && !past {
            return PlanStep::SameModel(Duration::ZERO);
        }
        if let (false, Verdict::RetryAfter(wait)) = (key_lost, v) {
            return PlanStep::SameModel(wait);
        }
    }
    if plan.has_fallback && !past && policy.fallback_on.matches(outcome, plan.injected_key) {
        return PlanStep::Fallback;
    }
    PlanStep::Return
}

impl crate::config::Conditions {
    /// Whether `outcome` is one of these. A 429 out of quota is
    /// `insufficient-quota` only, and a 401/403 for a key sluice sent is
    /// `upstream-auth` only, whatever the status list says.
    pub fn matches(&self, outcome: Outcome, injected_key: bool) -> bool {
        match outcome {
            Outcome::Response { quota: true, .. } => self.insufficient_quota,
            Outcome::Response { status, .. }
                if injected_key && matches!(status.as_u16(), 401 | 403) =>
            {
                self.upstream_auth
            }
            Outcome::Response { status, .. } => self.statuses.contains(&status.as_u16()),
            Outcome::Failed(ProxyError::ConnectFailed) => self.connect_failure,
            Outcome::Failed(ProxyError::UpstreamReset) => self.reset,
            Outcome::Failed(ProxyError::UpstreamTimeout) => self.timeout,
            Outcome::Failed(_) => false,
            Outcome::StreamError => self.stream_error,
        }
    }
}

/// Which failures before response headers `retry_on` covers. An untrusted
/// certificate and a client-side problem never get better by retrying.
fn retryable(e: ProxyError, policy: &RetryPolicy) -> bool {
    match e {
        ProxyError::ConnectFailed => policy.retry_on.connect_failure,
        ProxyError::UpstreamReset => policy.retry_on.reset,
        ProxyError::UpstreamTimeout => policy.retry_on.timeout,
        _ => false,
    }
}

/// A failed attempt as a fixed word for metric labels.
fn failure_word(e: ProxyError) -> &'static str {
    match e {
        ProxyError::ConnectFailed => "connect_failure",
        ProxyError::UntrustedCertificate => "tls_untrusted",
        ProxyError::UpstreamReset => "reset",
        ProxyError::UpstreamTimeout => "timeout",
        ProxyError::DeadlineExceeded => "deadline",
        _ => "client_error",
    }
}

/// A status code's class as a fixed word.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `rand(0, min(max, base * 2^retry))`, with `retry` counted from 0: full
/// jitter spreads synchronized clients apart (AWS architecture blog).
pub fn backoff(base: Duration, max: Duration, retry: u32, rng: &mut fastrand::Rng) -> Duration {
    let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
    let cap = base.saturating_mul(factor).min(max);
    let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=cap_ns))
}

/// The default `[routes.retry]` with `attempts`, for tests.
#[cfg(test)]
pub fn test_policy(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        backoff_base: Duration::from_millis(250),
        backoff_max: Duration::from_secs(8),
        retry_on: crate::config::Conditions {
            connect_failure: true,
            reset: true,
            statuses: vec![429, 500, 502, 503, 504],
            ..Default::default()
        },
        honor_retry_after: true,
        max_retry_after: Duration::from_secs(20),
        budget: crate::config::BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        },
        fallback_on: crate::config::Conditions::default(),
        commit: crate::config::Commit::Headers,
        commit_buffer: 64 << 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, hint: Option<u64>, quota: bool) -> Outcome {
        Outcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            hint: hint.map(Duration::from_secs),
            quota,
        }
    }

    fn judge(outcome: Outcome, attempt: u32, total: Option<Duration>) -> Verdict {
        let now = Instant::now();
        let mut rng = fastrand::Rng::with_seed(1);
        verdict(
            &test_policy(3),
            outcome,
            attempt,
            3,
            now,
            total.map(|t| now + t),
            &mut rng,
        )
    }

    fn retries(v: Verdict) -> bool {
        matches!(v, Verdict::RetryAfter(_))
    }

    #[test]
    fn listed_statuses_and_failures_are_retried_others_pass() {
        for code in [429, 500, 502, 503, 504] {
            assert!(retries(judge(status(code, None, false), 1, None)), "{code}");
        }
        for code in [200, 400, 401, 404, 501] {
            assert_eq!(
                judge(status(code, None, false), 1, None),
                Verdict::Return,
                "{code}"
            );
        }
        for e in [ProxyError::ConnectFailed, ProxyError::UpstreamReset] {
            assert!(retries(judge(Outcome::Failed(e), 1, None)), "{e:?}");
        }
        // Off by default (the upstream may still be generating), never for
        // an untrusted certificate or the client's own body.
        for e in [
            ProxyError::UpstreamTimeout,
            ProxyError::UntrustedCertificate,
            ProxyError::DeadlineExceeded,
            ProxyError::BadRequest,
            ProxyError::RequestTooLarge,
        ] {
            assert_eq!(judge(Outcome::Failed(e), 1, None), Verdict::Return, "{e:?}");
        }
    }

    #[test]
    fn the_last_attempt_is_returned() {
        assert!(retries(judge(status(503, None, false), 2, None)));
        assert_eq!(judge(status(503, None, false), 3, None), Verdict::Return);
    }

    #[test]
    fn insufficient_quota_is_never_retried() {
        assert_eq!(judge(status(429, None, true), 1, None), Verdict::Return);
    }

    #[test]
    fn a_hint_sets_the_least_wait_and_a_long_one_is_not_waited_for() {
        assert_eq!(
            judge(status(429, Some(7), false), 1, None),
            Verdict::RetryAfter(Duration::from_secs(7)),
            "the hint is longer than any first backoff (250 ms)"
        );
        assert_eq!(
            judge(status(429, Some(21), false), 1, None),
            Verdict::Return
        );
        assert!(retries(judge(status(429, Some(20), false), 1, None)));
    }

    #[test]
    fn no_retry_whose_wait_would_cross_the_total_deadline() {
        assert_eq!(
            judge(status(429, Some(5), false), 1, Some(Duration::from_secs(5))),
            Verdict::Return
        );
        assert!(retries(judge(
            status(429, Some(5), false),
            1,
            Some(Duration::from_secs(6))
        )));
    }

    #[test]
    fn outcomes_have_fixed_words() {
        assert_eq!(status(200, None, false).label(), "2xx");
        assert_eq!(status(429, None, false).reason(), "status_429");
        assert_eq!(status(503, None, false).reason(), "status_5xx");
        assert_eq!(status(404, None, false).reason(), "status_4xx");
        assert_eq!(
            Outcome::Failed(ProxyError::ConnectFailed).label(),
            "connect_failure"
        );
        assert_eq!(Outcome::Failed(ProxyError::UpstreamReset).reason(), "reset");
    }

    #[test]
    fn backoff_stays_within_full_jitter_bounds_at_every_step() {
        let (base, max) = (Duration::from_millis(250), Duration::from_secs(8));
        let mut rng = fastrand::Rng::with_seed(7);
        for retry in 0..40 {
            let cap = (base * 2u32.saturating_pow(retry.min(20))).min(max);
            let mut seen_high = false;
            for _ in 0..2000 {
                let d = backoff(base, max, retry, &mut rng);
                assert!(d <= cap, "retry {retry}: {d:?} > {cap:?}");
                seen_high |= d > cap / 2;
            }
            // Full jitter uses the whole range, not just its bottom.
            assert!(seen_high, "retry {retry}: never above half the cap");
        }
        // A zero base means no wait at all.
        assert_eq!(backoff(Duration::ZERO, max, 3, &mut rng), Duration::ZERO);
    }

    fn plan(model_attempts_left: bool, untried_left: bool, has_fallback: bool) -> PlanState {
        PlanState {
            model_attempts_left,
            untried_left,
            has_fallback,
            injected_key: true,
        }
    }

    fn fallback_policy() -> RetryPolicy {
        let mut p = test_policy(3);
        p.fallback_on = crate::config::Conditions {
            connect_failure: true,
            reset: true,
            insufficient_quota: true,
            upstream_auth: true,
            statuses: vec![429, 503],
            ..Default::default()
        };
        p
    }

    fn step(v: Verdict, outcome: Outcome, plan: PlanState) -> PlanStep {
        let p = fallback_policy();
        steer(&p, v, outcome, plan, Instant::now(), None)
    }

    #[test]
    fn a_retry_waits_only_before_a_deployment_already_tried() {
        let wait = Verdict::RetryAfter(Duration::from_secs(4));
        let busy = status(503, Some(4), false);
        assert_eq!(
            step(wait, busy, plan(true, true, true)),
            PlanStep::SameModel(Duration::ZERO)
        );
        assert_eq!(
            step(wait, busy, plan(true, false, true)),
            PlanStep::SameModel(Duration::from_secs(4))
        );
        // A hint too long to wait for is the tried deployment's: another one goes at once.
        let long = status(429, Some(60), false);
        assert_eq!(
            step(Verdict::Return, long, plan(true, true, true)),
            PlanStep::SameModel(Duration::ZERO)
        );
        assert_eq!(
            step(Verdict::Return, long, plan(true, false, true)),
            PlanStep::Fallback
        );
        // The model's attempts are spent: down the chain, at once.
        assert_eq!(
            step(wait, busy, plan(false, true, true)),
            PlanStep::Fallback
        );
        assert_eq!(step(wait, busy, plan(false, true, false)), PlanStep::Return);
    }

    #[test]
    fn a_lost_key_or_quota_moves_to_another_deployment_never_the_same() {
        let quota = status(429, None, true);
        let denied = status(401, None, false);
        for o in [quota, denied] {
            assert_eq!(
                step(Verdict::Return, o, plan(true, true, true)),
                PlanStep::SameModel(Duration::ZERO)
            );
            // No other key: the chain, by fallback_on's insufficient-quota/upstream-auth.
            assert_eq!(
                step(Verdict::Return, o, plan(true, false, true)),
                PlanStep::Fallback
            );
            assert_eq!(
                step(Verdict::Return, o, plan(true, false, false)),
                PlanStep::Return
            );
        }
        // A 401 for the client's own key is not ours to move.
        let own = PlanState {
            injected_key: false,
            ..plan(true, true, true)
        };
        assert_eq!(step(Verdict::Return, denied, own), PlanStep::Return);
        // Without the words, a quota 429 does not fall back even though 429 is listed.
        let mut p = fallback_policy();
        p.fallback_on.insufficient_quota = false;
        let s = steer(
            &p,
            Verdict::Return,
            quota,
            plan(true, false, true),
            Instant::now(),
            None,
        );
        assert_eq!(s, PlanStep::Return);
    }

    #[test]
    fn fallback_on_is_separate_from_retry_on_and_stops_at_the_deadline() {
        // A timeout is not retried by default, and not listed here either.
        let timeout = Outcome::Failed(ProxyError::UpstreamTimeout);
        assert_eq!(
            step(Verdict::Return, timeout, plan(true, true, true)),
            PlanStep::Return
        );
        // 400 (context length, content filter): the client's problem.
        assert_eq!(
            step(
                Verdict::Return,
                status(400, None, false),
                plan(true, true, true)
            ),
            PlanStep::Return
        );
        let reset = Outcome::Failed(ProxyError::UpstreamReset);
        assert_eq!(
            step(Verdict::Return, reset, plan(false, false, true)),
            PlanStep::Fallback
        );
        let now = Instant::now();
        let p = fallback_policy();
        let s = steer(
            &p,
            Verdict::Return,
            reset,
            plan(false, false, true),
            now,
            Some(now),
        );
        assert_eq!(s, PlanStep::Return);
    }
}
