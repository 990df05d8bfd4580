//! The attempt loop: try, ask [`retry::verdict`], draw on the budget, wait,
//! try again. What one attempt is (which backend, how it is sent and judged)
//! is the [`Attempt`] implementation's; the loop knows only outcomes, so it
//! is tested here against a scripted upstream under tokio's paused clock.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::RetryPolicy;
use crate::error::ProxyError;
use crate::retry::{self, Budget, Outcome, Verdict};

/// One attempt at the upstream, as the loop drives it.
pub trait Attempt {
    type Response;

    /// Makes attempt `n` (from 1), sent at `sent`: the response with how
    /// the retry policy sees it, or why there is none.
    async fn attempt(
        &mut self,
        n: u32,
        sent: Instant,
    ) -> Result<(Self::Response, Outcome), ProxyError>;

    /// The route's verdict on attempt `n`, which the request's plan may
    /// change: another deployment of its model, or the next model of its
    /// fallback chain. The default keeps it.
    fn steer(&mut self, v: Verdict, _outcome: Outcome, _n: u32, _now: Instant) -> Verdict {
        v
    }

    /// The budget refused a retry: the last outcome stands.
    fn budget_refused(&mut self) {}

    /// Attempt `n` is retried for `reason` after `wait`.
    fn retrying(&mut self, _n: u32, _reason: &'static str, _wait: Duration) {}
}

/// The limits of one request's attempts.
pub struct Plan<'a> {
    pub policy: &'a RetryPolicy,
    pub budget: &'a Budget,
    /// At most this many attempts: the route's, or 1 for a body with no
    /// replay copy.
    pub max: u32,
    /// When the first attempt starts (the budget's deposit read the clock
    /// then too).
    pub first: Instant,
    pub total: Option<Instant>,
}

/// Tries until an outcome is the request's. A retry happens only before
/// anything reached the client: a response that is retried is dropped
/// unread. When the budget refuses a retry, the last outcome stands.
pub async fn run<A: Attempt>(a: &mut A, plan: Plan<'_>) -> Result<A::Response, ProxyError> {
    let mut rng = fastrand::Rng::new();
    let mut sent = plan.first;
    let mut n = 1;
    loop {
        let tried = a.attempt(n, sent).await;
        let outcome = match &tried {
            Ok((_, outcome)) => *outcome,
            Err(e) => Outcome::Failed(*e),
        };
        let now = Instant::now();
        let v = retry::verdict(plan.policy, outcome, n, plan.max, now, plan.total, &mut rng);
        let wait = match a.steer(v, outcome, n, now) {
            // One cap for retries, switches and fallbacks alike.
            Verdict::RetryAfter(wait) if n < plan.max => wait,
            _ => return tried.map(|(res, _)| res),
        };
        if !plan.budget.try_withdraw_at(now.into_std()) {
            a.budget_refused();
            return tried.map(|(res, _)| res);
        }
        a.retrying(n, outcome.reason(), wait);
        drop(tried);
        tokio::time::sleep(wait).await;
        sent = Instant::now();
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BudgetConfig;
    use crate::retry::test_policy;
    use http::StatusCode;

    /// An upstream played from a script: each attempt takes the next entry
    /// after its delay, and records when it was sent.
    struct Scripted {
        script: Vec<(Duration, Result<Outcome, ProxyError>)>,
        sent: Vec<Instant>,
        refused: bool,
        reasons: Vec<&'static str>,
    }

    impl Attempt for Scripted {
        type Response = StatusCode;

        async fn attempt(
            &mut self,
            n: u32,
            sent: Instant,
        ) -> Result<(StatusCode, Outcome), ProxyError> {
            self.sent.push(sent);
            let (delay, result) = self.script[n as usize - 1];
            tokio::time::sleep(delay).await;
            result.map(|o| match o {
                Outcome::Response { status, .. } => (status, o),
                Outcome::StreamError => (StatusCode::OK, o),
                Outcome::Failed(_) => unreachable!("a failure is an Err"),
            })
        }

        fn budget_refused(&mut self) {
            self.refused = true;
        }

        fn retrying(&mut self, _n: u32, reason: &'static str, _wait: Duration) {
            self.reasons.push(reason);
        }
    }

    fn status(code: u16, hint_ms: Option<u64>) -> Result<Outcome, ProxyError> {
        Ok(Outcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            hint: hint_ms.map(Duration::from_millis),
            quota: false,
        })
    }

    /// Runs `script` with the default policy and a fresh budget.
    async fn play(
        script: Vec<(Duration, Result<Outcome, ProxyError>)>,
        max: u32,
        total: Option<Duration>,
    ) -> (Result<StatusCode, ProxyError>, Scripted) {
        let policy = test_policy(3);
        let budget = Budget::new(policy.budget);
        play_with(script, &policy, &budget, max, total).await
    }

    async fn play_with(
        script: Vec<(Duration, Result<Outcome, ProxyError>)>,
        policy: &RetryPolicy,
        budget: &Budget,
        max: u32,
        total: Option<Duration>,
    ) -> (Result<StatusCode, ProxyError>, Scripted) {
        let mut up = Scripted {
            script,
            sent: Vec::new(),
            refused: false,
            reasons: Vec::new(),
        };
        let first = Instant::now();
        let plan = Plan {
            policy,
            budget,
            max,
            first,
            total: total.map(|t| first + t),
        };
        let res = run(&mut up, plan).await;
        (res, up)
    }

    fn gaps(sent: &[Instant]) -> Vec<Duration> {
        sent.windows(2).map(|w| w[1] - w[0]).collect()
    }

    const NOW: Duration = Duration::ZERO;

    #[tokio::test(start_paused = true)]
    async fn two_503s_then_a_200_with_full_jitter_backoff_between() {
        let script = vec![
            (NOW, status(503, None)),
            (NOW, status(503, None)),
            (NOW, status(200, None)),
        ];
        let (res, up) = play(script, 3, None).await;
        assert_eq!(res, Ok(StatusCode::OK));
        assert_eq!(up.sent.len(), 3);
        assert_eq!(up.reasons, ["status_5xx", "status_5xx"]);
        let g = gaps(&up.sent);
        assert!(
            g[0] <= Duration::from_millis(250),
            "first backoff within base: {g:?}"
        );
        assert!(
            g[1] <= Duration::from_millis(500),
            "second within 2 x base: {g:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_response_passes_after_every_attempt() {
        let script = vec![(NOW, status(502, None)); 3];
        let (res, up) = play(script, 3, None).await;
        assert_eq!(res, Ok(StatusCode::BAD_GATEWAY));
        assert_eq!(up.sent.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_sets_the_wait_and_one_over_max_is_returned_at_once() {
        let script = vec![(NOW, status(429, Some(1000))), (NOW, status(200, None))];
        let (res, up) = play(script, 3, None).await;
        assert_eq!(res, Ok(StatusCode::OK));
        let g = gaps(&up.sent);
        assert!(
            g[0] >= Duration::from_secs(1) && g[0] < Duration::from_millis(1010),
            "{g:?}"
        );
        let script = vec![(NOW, status(429, Some(21_000))), (NOW, status(200, None))];
        let start = Instant::now();
        let (res, up) = play(script, 3, None).await;
        assert_eq!(res, Ok(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(up.sent.len(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_before_headers_are_retried_as_the_route_lists() {
        let script = vec![
            (NOW, Err(ProxyError::ConnectFailed)),
            (NOW, Err(ProxyError::UpstreamReset)),
            (NOW, status(200, None)),
        ];
        let (res, up) = play(script, 3, None).await;
        assert_eq!(res, Ok(StatusCode::OK));
        assert_eq!(up.reasons, ["connect_failure", "reset"]);
        // timeout is off by default: one attempt, and its error.
        let script = vec![(Duration::from_secs(30), Err(ProxyError::UpstreamTimeout))];
        let (res, up) = play(script, 3, None).await;
        assert_eq!(res, Err(ProxyError::UpstreamTimeout));
        assert_eq!(up.sent.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_without_a_replay_copy_is_tried_once() {
        let script = vec![(NOW, status(503, None)), (NOW, status(200, None))];
        let (res, up) = play(script, 1, None).await;
        assert_eq!(res, Ok(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(up.sent.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_starts_whose_wait_would_end_past_total() {
        // Each attempt takes 400 ms; a hint of 500 ms would end at 900 ms,
        // past a total of 800 ms: the 503 is returned then, not at 800 ms.
        let script = vec![(Duration::from_millis(400), status(503, Some(500))); 3];
        let start = Instant::now();
        let (res, up) = play(script, 3, Some(Duration::from_millis(800))).await;
        assert_eq!(res, Ok(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(up.sent.len(), 1);
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_the_retries_and_says_so() {
        let mut p = test_policy(3);
        p.budget = BudgetConfig {
            ratio: 0.5,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        };
        let budget = Budget::new(p.budget);
        // One deposit at ratio 0.5 funds half a retry: none.
        budget.deposit_at(Instant::now().into_std());
        let script = vec![(NOW, status(503, None)), (NOW, status(200, None))];
        let (res, up) = play_with(script, &p, &budget, 3, None).await;
        assert_eq!(res, Ok(StatusCode::SERVICE_UNAVAILABLE));
        assert!(up.refused);
        assert_eq!(up.sent.len(), 1);
        // Two deposits fund one.
        budget.deposit_at(Instant::now().into_std());
        budget.deposit_at(Instant::now().into_std());
        let script = vec![(NOW, status(503, None)), (NOW, status(200, None))];
        let (res, up) = play_with(script, &p, &budget, 3, None).await;
        assert_eq!(res, Ok(StatusCode::OK));
        assert!(!up.refused);
    }
}
