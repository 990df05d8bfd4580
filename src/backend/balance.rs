//! Which of a model's deployments takes the next attempt (SPEC §9):
//! least-request, weighted, priority, or a rendezvous hash of a header.
//! Least-request is Envoy's: with equal weights, the less loaded of two
//! distinct deployments drawn at random (P2C); with unequal weights, a
//! weighted draw over `weight / (in_flight + 1)`, so at zero load traffic
//! splits by weight and a loaded deployment gets less.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use super::health::{Access, Health, Report, State};
use crate::metrics::DeploymentMeters;
use crate::tokens::{Cell, Charge};

use super::Backend;
use crate::config::Balance;

/// What a deployment carries now and how healthy it is, shared by every
/// route that reaches it and kept across reloads. The count is the
/// `sluice_deployment_in_flight` gauge itself. A route's plain upstream
/// has no health: it is never ejected.
#[derive(Debug, Default)]
pub struct Load {
    in_flight: Gauge,
    pub health: Option<Health>,
    /// `sluice_deployment_state` by state, and the ejection counter.
    pub meters: Option<DeploymentMeters>,
    /// `rpm`, `tpm`, `max_concurrent`, when the deployment sets any.
    capacity: Option<Box<Capacity>>,
}

/// What a deployment may take (SPEC §10): one without room is passed over.
#[derive(Debug)]
pub struct Capacity {
    /// 0: no cap.
    pub max_concurrent: u32,
    /// Requests per minute: a bucket charged one per attempt.
    pub rpm: Option<Arc<Cell>>,
    /// Tokens per minute: charged the request's estimate, settled later.
    pub tpm: Option<Arc<Cell>>,
}

impl Capacity {
    /// From a deployment's settings; `None` when it sets none. Each bucket
    /// holds ten seconds' worth, as a token limit does by default.
    pub fn new(rpm: u32, tpm: u64, max_concurrent: u32) -> Option<Box<Self>> {
        let base = Instant::now();
        let cell = |per_minute: u64| {
            (per_minute > 0).then(|| Arc::new(Cell::new(per_minute, (per_minute / 6).max(1), base)))
        };
        let c = Self {
            max_concurrent,
            rpm: cell(u64::from(rpm)),
            tpm: cell(tpm),
        };
        (max_concurrent > 0 || c.rpm.is_some() || c.tpm.is_some()).then(|| Box::new(c))
    }
}

/// An attempt a deployment took: its in-flight slot, and its `tpm` charge.
#[derive(Debug)]
pub struct Taken {
    pub in_flight: InFlight,
    pub charge: Option<Charge>,
}

impl Load {
    pub fn new(
        in_flight: Gauge,
        health: Health,
        meters: DeploymentMeters,
        capacity: Option<Box<Capacity>>,
    ) -> Self {
        meters.show(State::Healthy);
        Self {
            in_flight,
            health: Some(health),
            meters: Some(meters),
            capacity,
        }
    }

    /// Whether it charges tokens (`tpm`): requests to it need an estimate.
    pub fn counts_tokens(&self) -> bool {
        self.capacity.as_ref().is_some_and(|c| c.tpm.is_some())
    }

    /// Whether it has room for a request of `cost` tokens now.
    pub fn has_room(&self, cost: u64, now: Instant) -> bool {
        let Some(c) = &self.capacity else {
            return true;
        };
        (c.max_concurrent == 0 || self.in_flight() < c.max_concurrent)
            && c.rpm.as_ref().is_none_or(|r| r.has_room(1, now))
            && c.tpm.as_ref().is_none_or(|t| t.has_room(cost, now))
    }

    /// Takes an attempt of `cost` tokens if there is room: the in-flight
    /// slot first (exact under races), then the request and the tokens.
    pub fn take(self: &Arc<Self>, cost: u64, now: Instant) -> Option<Taken> {
        let Some(c) = &self.capacity else {
            return Some(Taken {
                in_flight: InFlight::start(self),
                charge: None,
            });
        };
        let before = self.in_flight.inc();
        let in_flight = InFlight(self.clone());
        if c.max_concurrent > 0 && before >= i64::from(c.max_concurrent) {
            return None;
        }
        if let Some(rpm) = &c.rpm {
            rpm.try_charge(1, now).ok()?;
        }
        let charge = match &c.tpm {
            Some(tpm) => Some(tpm.charge(cost, now).ok()?),
            None => None,
        };
        Some(Taken { in_flight, charge })
    }

    /// The same settings (a reload keeps the state only then).
    pub fn same_capacity(&self, rpm: u32, tpm: u64, max_concurrent: u32) -> bool {
        let per_minute = |c: &Option<Arc<Cell>>| c.as_ref().map_or(0, |c| c.tokens_per_minute());
        match &self.capacity {
            None => rpm == 0 && tpm == 0 && max_concurrent == 0,
            Some(c) => {
                c.max_concurrent == max_concurrent
                    && per_minute(&c.rpm) == u64::from(rpm)
                    && per_minute(&c.tpm) == tpm
            }
        }
    }

    /// Whether an attempt may go to it now.
    pub fn access(&self, now: Instant) -> Access {
        self.health.as_ref().map_or(Access::Open, |h| h.access(now))
    }

    /// Records what an attempt told of the deployment's health.
    pub fn report(&self, r: Report, now: Instant) {
        let (Some(h), Some(m)) = (&self.health, &self.meters) else {
            return;
        };
        let before = h.state(now);
        if let Some(why) = h.report(r, now) {
            m.ejected(why.as_str());
        }
        // A success leaves a healthy deployment healthy.
        if r == Report::Fine && before == State::Healthy {
            return;
        }
        let after = h.state(now);
        if after != before {
            m.show(after);
        }
    }

    /// Its rate limit is used up for `wait` (`x-ratelimit-remaining-*: 0`).
    pub fn saturate(&self, wait: std::time::Duration, now: Instant) {
        let (Some(h), Some(m)) = (&self.health, &self.meters) else {
            return;
        };
        h.saturate(now + wait);
        m.show(h.state(now));
    }

    /// Takes the probe of an ejected deployment whose ejection is over.
    pub fn take_probe(&self, now: Instant) -> bool {
        let (Some(h), Some(m)) = (&self.health, &self.meters) else {
            return true;
        };
        let took = h.take_probe(now);
        if took {
            m.show(h.state(now));
        }
        took
    }

    pub fn in_flight(&self) -> u32 {
        u32::try_from(self.in_flight.get()).unwrap_or(0)
    }
}

/// One request in flight at a deployment, until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Load>);

impl InFlight {
    pub fn start(load: &Arc<Load>) -> Self {
        load.in_flight.inc();
        Self(load.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Picks one of `candidates` (indices into `list`, never empty). `key` is
/// the hash header's value for `Balance::Hash`; without it, least-request.
pub fn choose(
    balance: Balance,
    list: &[Arc<Backend>],
    candidates: &[usize],
    key: Option<&[u8]>,
    rng: &mut fastrand::Rng,
) -> usize {
    if let [only] = candidates {
        return *only;
    }
    match (balance, key) {
        (Balance::Hash, Some(key)) => rendezvous(list, candidates, key),
        (Balance::Weighted, _) => by_weight(list, candidates, rng, |_| 1.0),
        (Balance::Priority, _) => {
            let best = candidates
                .iter()
                .map(|&i| list[i].priority)
                .min()
                .expect("candidates");
            let top: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|&i| list[i].priority == best)
                .collect();
            by_weight(list, &top, rng, |_| 1.0)
        }
        (Balance::LeastRequest | Balance::Hash, _) => least_request(list, candidates, rng),
    }
}

fn least_request(list: &[Arc<Backend>], candidates: &[usize], rng: &mut fastrand::Rng) -> usize {
    let w0 = list[candidates[0]].weight;
    if candidates.iter().all(|&i| list[i].weight == w0) {
        let a = rng.usize(..candidates.len());
        let mut b = rng.usize(..candidates.len() - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (candidates[a], candidates[b]);
        let (la, lb) = (list[a].load.in_flight(), list[b].load.in_flight());
        return match la.cmp(&lb) {
            std::cmp::Ordering::Less => a,
            std::cmp::Ordering::Greater => b,
            std::cmp::Ordering::Equal if rng.bool() => a,
            std::cmp::Ordering::Equal => b,
        };
    }
    by_weight(list, candidates, rng, |b| {
        1.0 / (f64::from(b.load.in_flight()) + 1.0)
    })
}

/// A draw by `weight × factor(backend)`.
fn by_weight(
    list: &[Arc<Backend>],
    candidates: &[usize],
    rng: &mut fastrand::Rng,
    factor: impl Fn(&Backend) -> f64,
) -> usize {
    let share = |i: usize| f64::from(list[i].weight) * factor(&list[i]);
    let sum: f64 = candidates.iter().map(|&i| share(i)).sum();
    let mut at = rng.f64() * sum;
    for &i in candidates {
        at -= share(i);
        if at < 0.0 {
            return i;
        }
    }
    *candidates.last().expect("candidates")
}

/// Weighted rendezvous hashing: the same key goes to the same deployment
/// while it is eligible, and only the keys of a deployment that leaves move.
fn rendezvous(list: &[Arc<Backend>], candidates: &[usize], key: &[u8]) -> usize {
    let score = |i: usize| {
        let b = &list[i];
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        b.upstream.name.hash(&mut h);
        b.model.hash(&mut h);
        // A uniform draw in (0, 1], then -ln(u)/weight: the smallest wins.
        let u = ((h.finish() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        -u.ln() / f64::from(b.weight)
    };
    candidates
        .iter()
        .copied()
        .min_by(|&a, &b| score(a).total_cmp(&score(b)))
        .expect("candidates")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::provider::OPENAI;

    /// A backend of upstream `name` with `weight`, for picking only.
    pub(crate) fn backend(name: &str, weight: u32, priority: u32) -> Arc<Backend> {
        let text = format!(
            "[upstreams.{name}]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nname = \"r\"\nupstream = \"{name}\"\n"
        );
        let cfg = crate::config::Config::parse(&text, "t", std::path::Path::new("."), &|_| None)
            .expect("config");
        let up = cfg.upstreams[name].clone();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let mut b = Backend::new(
            up.clone(),
            Backend::pool(&up),
            &Arc::default(),
            &OPENAI,
            metrics.backend("r", name),
        );
        b.weight = weight;
        b.priority = priority;
        Arc::new(b)
    }

    fn shares(list: &[Arc<Backend>], balance: Balance, n: usize) -> Vec<f64> {
        let mut rng = fastrand::Rng::with_seed(7);
        let all: Vec<usize> = (0..list.len()).collect();
        let mut counts = vec![0usize; list.len()];
        for _ in 0..n {
            counts[choose(balance, list, &all, None, &mut rng)] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn weighted_least_request_at_zero_load_splits_by_weight() {
        let list = [backend("a", 3, 0), backend("b", 1, 0)];
        for balance in [Balance::LeastRequest, Balance::Weighted] {
            let s = shares(&list, balance, 10_000);
            assert!((s[0] - 0.75).abs() < 0.05, "{balance:?}: {s:?}");
            assert!((s[1] - 0.25).abs() < 0.05, "{balance:?}: {s:?}");
        }
    }

    #[test]
    fn a_deployment_with_requests_in_flight_gets_a_lower_share() {
        // Unequal weights: the weighted draw over weight / (in_flight + 1).
        let list = [backend("a", 3, 0), backend("b", 1, 0)];
        let held: Vec<InFlight> = (0..5).map(|_| InFlight::start(&list[0].load)).collect();
        let s = shares(&list, Balance::LeastRequest, 10_000);
        // 3/6 against 1/1: a gets a third.
        assert!((s[0] - 1.0 / 3.0).abs() < 0.05, "{s:?}");
        drop(held);
        assert_eq!(list[0].load.in_flight(), 0);
        // Equal weights: two choices, the less loaded wins every time.
        let list = [backend("a", 1, 0), backend("b", 1, 0)];
        let _held = InFlight::start(&list[0].load);
        let s = shares(&list, Balance::LeastRequest, 1_000);
        assert_eq!(s[1], 1.0, "{s:?}");
        // Without load, equal weights split evenly.
        let list = [backend("a", 1, 0), backend("b", 1, 0), backend("c", 1, 0)];
        let s = shares(&list, Balance::LeastRequest, 10_000);
        assert!(s.iter().all(|x| (x - 1.0 / 3.0).abs() < 0.05), "{s:?}");
    }

    #[test]
    fn priority_takes_the_lowest_value_and_hash_is_sticky() {
        let list = [backend("a", 1, 1), backend("b", 5, 0), backend("c", 1, 0)];
        let s = shares(&list, Balance::Priority, 10_000);
        assert_eq!(s[0], 0.0, "{s:?}");
        assert!((s[1] - 5.0 / 6.0).abs() < 0.05, "{s:?}");
        let mut rng = fastrand::Rng::with_seed(1);
        let all = [0, 1, 2];
        let mut seen = std::collections::HashSet::new();
        for user in 0..200 {
            let key = format!("user-{user}");
            let first = choose(Balance::Hash, &list, &all, Some(key.as_bytes()), &mut rng);
            for _ in 0..5 {
                let again = choose(Balance::Hash, &list, &all, Some(key.as_bytes()), &mut rng);
                assert_eq!(again, first);
            }
            seen.insert(first);
            // Without a deployment that is not the key's, the key stays.
            let others: Vec<usize> = all
                .iter()
                .copied()
                .filter(|&i| i == first || i != (first + 1) % 3)
                .collect();
            assert_eq!(
                choose(
                    Balance::Hash,
                    &list,
                    &others,
                    Some(key.as_bytes()),
                    &mut rng
                ),
                first
            );
        }
        assert_eq!(seen.len(), 3, "keys spread over every deployment");
    }
}
