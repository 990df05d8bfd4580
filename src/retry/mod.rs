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
            if quota || !policy.on_status.contains(&status.as_u16()) {
                return Verdict::Return;
            }
            // A longer wait than the route allows: this response is the answer.
            if hint.is_some_and(|h| h > policy.max_retry_after) {
                return Verdict::Return;
            }
            hint
        }
        Outcome::Failed(e) if retryable(e, policy) => None,
        Outcome::Failed(_) => return Verdict::Return,
    };
    let backoff = backoff(policy.backoff_base, policy.backoff_max, attempt - 1, rng);
    let wait = backoff.max(hint.unwrap_or(Duration::ZERO));
    if total.is_some_and(|d| now + wait >= d) {
        return Verdict::Return;
    }
    Verdict::RetryAfter(wait)
}

/// Which failures before response headers `retry_on` covers. An untrusted
/// certificate and a client-side problem never get better by retrying.
fn retryable(e: ProxyError, policy: &RetryPolicy) -> bool {
    match e {
        ProxyError::ConnectFailed => policy.on_connect_failure,
        ProxyError::UpstreamReset => policy.on_reset,
        ProxyError::UpstreamTimeout => policy.on_timeout,
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
        on_connect_failure: true,
        on_reset: true,
        on_timeout: false,
        on_status: vec![429, 500, 502, 503, 504],
        honor_retry_after: true,
        max_retry_after: Duration::from_secs(20),
        budget: crate::config::BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        },
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
}
