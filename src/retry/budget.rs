//! A retry budget in the style of Finagle and Linkerd (and tower's
//! `TpsBudget`): every request deposits one token, every retry withdraws
//! `1 / ratio`, deposits expire after `ttl`, and `min_per_second` retries per
//! second are always allowed. So under a fully failing upstream, retries
//! stay near `ratio * requests + min_per_second * ttl` whatever `attempts` is.
//!
//! Lock-free: the window is a ring of slots, each one `AtomicU64` packing the
//! slot's epoch with its running balance, updated by compare-and-swap. A
//! check reads every slot; nothing is held across a request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::config::BudgetConfig;

/// Slots in the window; each covers `ttl / SLOTS`.
const SLOTS: usize = 10;
/// Fixed-point scale: one deposit is `SCALE` units.
const SCALE: i64 = 1000;
/// Low bits of a slot hold its balance (signed; about two million deposits
/// per slot), high bits its epoch (wrapping only after years).
const VALUE_BITS: u32 = 32;
const VALUE_MASK: u64 = (1 << VALUE_BITS) - 1;
const EPOCH_MASK: u64 = (1 << (64 - VALUE_BITS)) - 1;

/// One route's retry budget.
#[derive(Debug)]
pub struct Budget {
    config: BudgetConfig,
    slots: [AtomicU64; SLOTS],
    slot_ms: u64,
    origin: Instant,
    /// Units one retry costs: `SCALE / ratio`.
    withdraw: i64,
    /// Units always available: `min_per_second * ttl` retries' worth.
    reserve: i64,
}

impl Budget {
    pub fn new(config: BudgetConfig) -> Self {
        let withdraw = ((SCALE as f64) / config.ratio).round().max(1.0) as i64;
        let ttl_ms = config.ttl.as_millis().max(SLOTS as u128) as u64;
        Self {
            config,
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            slot_ms: ttl_ms / SLOTS as u64,
            origin: Instant::now(),
            withdraw,
            reserve: (i64::from(config.min_per_second) * config.ttl.as_millis() as i64 / 1000)
                .saturating_mul(withdraw),
        }
    }

    /// The parameters it was built with (an unchanged route keeps its budget on reload).
    pub fn config(&self) -> BudgetConfig {
        self.config
    }

    /// A request arrived.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Takes one retry's worth if the budget has it.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    pub fn deposit_at(&self, now: Instant) {
        self.add(self.epoch(now), SCALE);
    }

    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let epoch = self.epoch(now);
        // Check then act: concurrent retries can overdraw by a few, as in tower.
        let granted = self.reserve + self.balance(epoch) >= self.withdraw;
        if granted {
            self.add(epoch, -self.withdraw);
        }
        granted
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_millis() as u64 / self.slot_ms
    }

    fn add(&self, epoch: u64, amount: i64) {
        let slot = &self.slots[(epoch % SLOTS as u64) as usize];
        let tag = epoch & EPOCH_MASK;
        let mut current = slot.load(Relaxed);
        loop {
            let (e, v) = unpack(current);
            // A slot from an older epoch has expired: start it afresh.
            let value = if e == tag { v + amount } else { amount };
            match slot.compare_exchange_weak(current, pack(tag, value), Relaxed, Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Sum of the slots still inside the window.
    fn balance(&self, epoch: u64) -> i64 {
        let tag = epoch & EPOCH_MASK;
        self.slots
            .iter()
            .map(|s| unpack(s.load(Relaxed)))
            // Slots from the last SLOTS epochs (modulo the epoch's width).
            .filter(|(e, _)| tag.wrapping_sub(*e) & EPOCH_MASK < SLOTS as u64)
            .map(|(_, v)| v)
            .sum()
    }
}

fn pack(epoch: u64, value: i64) -> u64 {
    (epoch << VALUE_BITS) | (value as u64 & VALUE_MASK)
}

fn unpack(x: u64) -> (u64, i64) {
    // Sign-extend the low VALUE_BITS bits.
    let value = ((x << (64 - VALUE_BITS)) as i64) >> (64 - VALUE_BITS);
    (x >> VALUE_BITS, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget(ratio: f64, min_per_second: u32, ttl_secs: u64) -> Budget {
        Budget::new(BudgetConfig {
            ratio,
            min_per_second,
            ttl: Duration::from_secs(ttl_secs),
        })
    }

    #[test]
    fn packing_round_trips_negative_values() {
        for v in [0, 1, -1, 123_456, -987_654_321] {
            assert_eq!(unpack(pack(42, v)), (42, v));
        }
    }

    #[test]
    fn retries_are_a_fraction_of_requests_plus_the_floor() {
        // ratio 0.2, 1 retry/s floor over 10 s: 100 requests allow 20 + 10 retries.
        let b = budget(0.2, 1, 10);
        let t0 = b.origin;
        for _ in 0..100 {
            b.deposit_at(t0);
        }
        let granted = (0..1000).take_while(|_| b.try_withdraw_at(t0)).count();
        assert_eq!(granted, 30);
        assert!(!b.try_withdraw_at(t0));
    }

    #[test]
    fn the_floor_alone_allows_min_per_second_times_ttl() {
        let b = budget(0.2, 10, 10);
        let t0 = b.origin;
        let granted = (0..1000).take_while(|_| b.try_withdraw_at(t0)).count();
        assert_eq!(granted, 100);
    }

    #[test]
    fn deposits_expire_after_ttl_with_a_fake_clock() {
        let b = budget(0.5, 0, 10);
        let t0 = b.origin;
        for _ in 0..10 {
            b.deposit_at(t0);
        }
        // Within the window: 10 deposits at ratio 0.5 allow 5 retries.
        let later = t0 + Duration::from_secs(9);
        assert!(b.try_withdraw_at(later));
        // Past ttl the deposits have expired; the withdrawal at 9 s has not.
        let expired = t0 + Duration::from_secs(11);
        assert!(!b.try_withdraw_at(expired));
        // Once everything has expired, new traffic alone funds retries.
        let fresh = t0 + Duration::from_secs(30);
        for _ in 0..2 {
            b.deposit_at(fresh);
        }
        assert!(b.try_withdraw_at(fresh));
        assert!(!b.try_withdraw_at(fresh));
    }

    #[test]
    fn withdrawals_are_safe_across_threads() {
        let b = std::sync::Arc::new(budget(1.0, 0, 10));
        let t0 = b.origin;
        for _ in 0..1000 {
            b.deposit_at(t0);
        }
        let granted: usize = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.try_withdraw_at(t0)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        // Check-then-act may overdraw by at most one per racing thread.
        assert!((1000..=1004).contains(&granted), "{granted}");
    }
}
