//! Micro-benchmark of the retry budget's hot path: what every request pays
//! (`deposit`) and what every retry decision pays (`try_withdraw`), on one
//! thread and on two contending threads. Run: `cargo bench --bench budget`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::BudgetConfig;
use sluice::retry::Budget;

/// Iterations: the full run under `cargo bench`, a smoke run under `cargo test`.
fn iterations() -> u32 {
    if std::env::args().any(|a| a == "--bench") {
        5_000_000
    } else {
        1_000
    }
}

fn budget() -> Budget {
    Budget::new(BudgetConfig {
        ratio: 0.2,
        min_per_second: 10,
        ttl: Duration::from_secs(10),
    })
}

fn per_op(threads: u32, op: fn(&Budget)) -> f64 {
    let n = iterations();
    let b = Arc::new(budget());
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || {
                for _ in 0..n {
                    op(black_box(&b));
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    started.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let deposit: fn(&Budget) = |b| b.deposit();
    let both: fn(&Budget) = |b| {
        b.deposit();
        black_box(b.try_withdraw());
    };
    for threads in [1, 2] {
        println!(
            "budget deposit, {threads} thread(s): {:.1} ns/op",
            per_op(threads, deposit)
        );
        println!(
            "budget deposit + try_withdraw, {threads} thread(s): {:.1} ns/op",
            per_op(threads, both)
        );
    }
}
