//! Which backend the next attempt goes to. The proxy asks on every attempt
//! (pingora's `upstream_peer()`), with the trail of the attempts so far; a
//! route with one backend always gets that one. A balancer (`balance.rs`)
//! and passive health (`health.rs`) answer here when a route has several
//! deployments, and a fallback chain is walked here too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use super::balance::{InFlight, Taken};
use super::health::Access;
use super::{balance, Backend};
use crate::config::{self, OnAllEjected};
use crate::error::ProxyError;

/// A route's backends, in config order; never empty.
#[derive(Debug)]
pub struct Backends {
    list: Vec<Arc<Backend>>,
    /// The route's own upstream: a plain route's only backend, a
    /// model-routed route's passthrough target.
    direct: Option<usize>,
    /// Model routing: every model the route reaches (those it allows and
    /// their fallbacks).
    models: Vec<ModelEntry>,
    /// Allowed models by name.
    by_name: HashMap<String, usize>,
}

/// One model as a route reaches it.
#[derive(Debug)]
pub struct ModelEntry {
    /// The model's name, for metric labels.
    pub name: Arc<str>,
    /// Its `sluice_model_requests_total{result="routed"}` series, once looked up.
    pub routed: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
    pub model: Arc<config::Model>,
    /// Whether clients may name it on this route.
    pub allowed: bool,
    /// Its deployments: indices into the route's backends.
    pub backends: Vec<usize>,
    /// Entry indices: itself, then its fallbacks.
    pub chain: Vec<usize>,
}

impl Backends {
    /// A plain route's one upstream.
    pub fn new(list: Vec<Arc<Backend>>) -> Self {
        assert!(!list.is_empty(), "a route has a backend");
        Self {
            list,
            direct: Some(0),
            models: Vec::new(),
            by_name: HashMap::new(),
        }
    }

    /// A model-routed route's backends: `direct` is its own upstream.
    pub fn models(list: Vec<Arc<Backend>>, direct: Option<usize>, models: Vec<ModelEntry>) -> Self {
        assert!(!list.is_empty(), "a route has a backend");
        let by_name = models
            .iter()
            .enumerate()
            .filter(|(_, m)| m.allowed)
            .map(|(i, m)| (m.model.name.clone(), i))
            .collect();
        Self {
            list,
            direct,
            models,
            by_name,
        }
    }

    /// Whether a request for `plan` may go to more than one backend: the
    /// deployments of its model and of the fallbacks it names.
    pub fn may_switch(&self, plan: &Plan) -> bool {
        let mut reach = self.models[plan.requested]
            .chain
            .iter()
            .flat_map(|&m| &self.models[m].backends);
        let first = reach.next();
        reach.any(|b| Some(b) != first)
    }

    /// The backend for the next attempt, and its index: the route's own
    /// upstream without a plan; with one, the plan's current model's
    /// deployments, those not yet tried in this request first.
    ///
    /// Ejected deployments are skipped; one whose ejection is over takes
    /// this request as its probe. When none is left, the model's
    /// `on_all_ejected` says: the one that recovers soonest (`probe`), the
    /// next model (`fallback`, which moves the plan), or 503 (`fail`). A
    /// model with one deployment is never blocked on a request's first
    /// attempt: ejection only keeps retries off it.
    pub fn pick(
        &self,
        trail: &Trail,
        plan: Option<&mut Plan>,
        key: Option<&[u8]>,
        rng: &mut fastrand::Rng,
        now: Instant,
        cost: u64,
    ) -> Result<Picked, ProxyError> {
        let Some(plan) = plan else {
            return Ok(Picked {
                index: self.direct.unwrap_or(0),
                taken: None,
            });
        };
        let picked = |index: usize, taken: Taken| Picked {
            index,
            taken: Some(taken),
        };
        loop {
            let entry = self.current(plan);
            // The common case: one deployment, open, with room.
            if let [only] = entry.backends[..] {
                let load = &self.list[only].load;
                if load.access(now) == Access::Open {
                    if let Some(t) = load.take(cost, now) {
                        return Ok(picked(only, t));
                    }
                }
            }
            let open: Vec<usize> = entry
                .backends
                .iter()
                .copied()
                .filter(|&i| self.list[i].load.access(now) != Access::Closed)
                .collect();
            // A deployment at its rpm, tpm or max_concurrent is passed over.
            let roomy: Vec<usize> = open
                .iter()
                .copied()
                .filter(|&i| self.list[i].load.has_room(cost, now))
                .collect();
            let untried: Vec<usize> = roomy.iter().copied().filter(|&i| !trail.tried(i)).collect();
            let mut candidates = if untried.is_empty() { roomy } else { untried };
            while !candidates.is_empty() {
                let i = balance::choose(entry.model.balance, &self.list, &candidates, key, rng);
                let load = &self.list[i].load;
                if load.access(now) == Access::Open || load.take_probe(now) {
                    if let Some(t) = load.take(cost, now) {
                        return Ok(picked(i, t));
                    }
                }
                // Another request took the probe or the room meanwhile.
                candidates.retain(|&c| c != i);
            }
            if !open.is_empty() {
                // Open but full: a later model of the chain with room, else
                // the least loaded here anyway (the provider's limit decides;
                // sluice's own figures are estimates).
                if self.fall_back_to_room(plan, cost, now) {
                    continue;
                }
                let healthy: Vec<usize> = open
                    .iter()
                    .copied()
                    .filter(|&i| self.list[i].load.access(now) == Access::Open)
                    .collect();
                if !healthy.is_empty() {
                    let i = balance::choose(entry.model.balance, &self.list, &healthy, key, rng);
                    let in_flight = InFlight::start(&self.list[i].load);
                    return Ok(picked(
                        i,
                        Taken {
                            in_flight,
                            charge: None,
                        },
                    ));
                }
            }
            let soonest = entry
                .backends
                .iter()
                .copied()
                .min_by_key(|&i| self.list[i].load.health.as_ref().and_then(|h| h.ready_at()))
                .expect("a model has a deployment");
            let anyway = |i: usize| {
                let in_flight = InFlight::start(&self.list[i].load);
                Ok(picked(
                    i,
                    Taken {
                        in_flight,
                        charge: None,
                    },
                ))
            };
            if entry.backends.len() == 1 && trail.attempts() == 0 {
                return anyway(soonest);
            }
            match entry.model.on_all_ejected {
                OnAllEjected::Fallback if self.fall_back(plan) => continue,
                OnAllEjected::Fail => {
                    let ready = self.list[soonest]
                        .load
                        .health
                        .as_ref()
                        .and_then(|h| h.ready_at());
                    let wait = ready.map_or(Duration::ZERO, |r| r.saturating_duration_since(now));
                    return Err(ProxyError::NoHealthyDeployment { wait });
                }
                _ => return anyway(soonest),
            }
        }
    }

    /// Moves the plan to the first later model of its chain that has an
    /// open deployment with room for `cost`; false (the plan unmoved) when
    /// none has.
    fn fall_back_to_room(&self, plan: &mut Plan, cost: u64, now: Instant) -> bool {
        let chain = &self.models[plan.requested].chain;
        let found = (plan.pos + 1..chain.len()).find(|&pos| {
            self.models[chain[pos]].backends.iter().any(|&i| {
                let load = &self.list[i].load;
                load.access(now) == Access::Open && load.has_room(cost, now)
            })
        });
        let Some(pos) = found else {
            return false;
        };
        while plan.pos < pos {
            self.fall_back(plan);
        }
        true
    }

    /// The model the plan is on.
    pub fn current(&self, plan: &Plan) -> &ModelEntry {
        &self.models[self.models[plan.requested].chain[plan.pos]]
    }

    /// Whether the plan's current model has a deployment not yet tried.
    pub fn has_untried(&self, plan: &Plan, trail: &Trail) -> bool {
        self.current(plan).backends.iter().any(|&i| !trail.tried(i))
    }

    /// Whether the plan's chain has a model after the current one.
    pub fn has_fallback(&self, plan: &Plan) -> bool {
        plan.pos + 1 < self.models[plan.requested].chain.len()
    }

    /// Moves the plan to the next model of its chain, if there is one.
    pub fn fall_back(&self, plan: &mut Plan) -> bool {
        if plan.pos + 1 >= self.models[plan.requested].chain.len() {
            return false;
        }
        plan.pos += 1;
        plan.on_model = 0;
        plan.fallbacks += 1;
        true
    }

    /// A plan for the allowed model `name`.
    pub fn plan(&self, name: &str) -> Option<Plan> {
        // A few names compare faster than they hash.
        let found = if self.models.len() <= 8 {
            self.models
                .iter()
                .position(|m| m.allowed && *m.name == *name)
        } else {
            self.by_name.get(name).copied()
        };
        found.map(|requested| Plan {
            requested,
            pos: 0,
            on_model: 0,
            fallbacks: 0,
        })
    }

    /// The route's own upstream, if it has one.
    pub fn direct(&self) -> Option<usize> {
        self.direct
    }

    /// The names a client may send, in config order.
    pub fn allowed(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.iter().filter(|m| m.allowed)
    }

    pub fn get(&self, i: usize) -> &Arc<Backend> {
        &self.list[i]
    }

    pub fn as_slice(&self) -> &[Arc<Backend>] {
        &self.list
    }
}

/// The backend an attempt goes to; a deployment's in-flight slot and
/// `tpm` charge with it.
#[derive(Debug)]
pub struct Picked {
    pub index: usize,
    pub taken: Option<Taken>,
}

/// One request's way down its model's chain.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The entry the client named.
    requested: usize,
    /// Where in its chain the request is.
    pos: usize,
    /// Attempts made on the current model.
    pub on_model: u32,
    /// Moves down the chain so far.
    pub fallbacks: u32,
}

/// One attempt: which of the route's backends, and what came of it.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub backend: usize,
    /// The response's status, or the attempt's outcome word.
    pub result: Result<StatusCode, &'static str>,
}

/// The attempts so far, in order. The first is held inline: a request that
/// is not retried allocates nothing for its trail.
#[derive(Debug, Default)]
pub struct Trail {
    first: Option<Step>,
    more: Vec<Step>,
}

impl Trail {
    pub fn push(&mut self, step: Step) {
        if self.first.is_none() {
            self.first = Some(step);
        } else {
            self.more.push(step);
        }
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        u32::from(self.first.is_some()) + self.more.len() as u32
    }

    /// Every attempt, in order.
    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.first.iter().chain(&self.more)
    }

    pub fn last(&self) -> Option<&Step> {
        self.more.last().or(self.first.as_ref())
    }

    /// Changes what the last attempt came to (a response held for its
    /// first event that failed there).
    pub fn amend_last(&mut self, result: Result<StatusCode, &'static str>) {
        if let Some(last) = self.more.last_mut().or(self.first.as_mut()) {
            last.result = result;
        }
    }

    /// Whether backend `i` was tried in this request.
    pub fn tried(&self, i: usize) -> bool {
        self.steps().any(|s| s.backend == i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trail_keeps_the_first_step_inline() {
        let mut t = Trail::default();
        assert_eq!((t.attempts(), t.last().is_none()), (0, true));
        t.push(Step {
            backend: 0,
            result: Err("reset"),
        });
        assert_eq!(t.attempts(), 1);
        assert_eq!(t.more.capacity(), 0);
        t.push(Step {
            backend: 1,
            result: Ok(StatusCode::OK),
        });
        assert_eq!(t.attempts(), 2);
        assert_eq!(t.last().unwrap().backend, 1);
        let order: Vec<usize> = t.steps().map(|s| s.backend).collect();
        assert_eq!(order, [0, 1]);
    }
}
