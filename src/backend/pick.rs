//! Which backend the next attempt goes to. The proxy asks on every attempt
//! (pingora's `upstream_peer()`), with the trail of the attempts so far; a
//! route with one backend always gets that one. A balancer (`balance.rs`)
//! and passive health (`health.rs`) answer here when a route has several
//! deployments, and a fallback chain is walked here too.

use std::sync::Arc;

use http::StatusCode;

use super::Backend;

/// A route's backends, in config order; never empty.
#[derive(Debug)]
pub struct Backends {
    list: Vec<Arc<Backend>>,
}

impl Backends {
    pub fn new(list: Vec<Arc<Backend>>) -> Self {
        assert!(!list.is_empty(), "a route has a backend");
        Self { list }
    }

    /// The backend for the next attempt, and its index.
    pub fn pick(&self, _trail: &Trail) -> (usize, &Arc<Backend>) {
        (0, &self.list[0])
    }

    pub fn get(&self, i: usize) -> &Arc<Backend> {
        &self.list[i]
    }

    pub fn as_slice(&self) -> &[Arc<Backend>] {
        &self.list
    }
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
