//! The load generator: closed-loop request/response load, bursts of SSE
//! streams with per-chunk lag, and long-held streams for memory.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::client::{chat_request, shaped_request, Conn, Shape};
use crate::mock::now_ns;

/// How long one request/response may take before it counts as an error.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Latencies in microseconds, 1 µs to 10 min, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

#[derive(Debug)]
pub struct Fixed {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub latency: Histogram<u64>,
}

impl Fixed {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// The measured window of a run, shared with a sampler that reads the
/// proxy's CPU time at its edges.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn after(warmup: Duration, measure: Duration) -> Self {
        let start = Instant::now() + warmup;
        Window {
            start,
            end: start + measure,
        }
    }
}

/// `count` chat requests one after another on one connection; the first
/// that fails or is not a 200 is the error.
pub async fn one_by_one(addr: SocketAddr, count: u64, stream: Option<u64>) -> Result<(), String> {
    // A stream's chunks 1 ms apart (the mock's shortest interval).
    let request = chat_request(addr, stream.map(|n| (n, 1)));
    let mut conn = Conn::new(addr);
    for i in 0..count {
        match conn.exchange(&request, |_| {}).await {
            Ok(200) => {}
            Ok(status) => return Err(format!("request {i}: status {status}")),
            Err(e) => return Err(format!("request {i}: {e}")),
        }
    }
    Ok(())
}

/// `conns` connections, each sending the next request as soon as the last
/// answer is in (or `pause` after it). Only answers that arrive inside
/// `window` count.
pub fn closed_loop(
    addr: SocketAddr,
    shape: &Shape,
    conns: usize,
    pause: Duration,
    window: Window,
) -> impl std::future::Future<Output = Fixed> + 'static {
    let request: Arc<[u8]> = shaped_request(addr, None, shape).into();
    async move {
        let mut tasks = Vec::with_capacity(conns);
        for _ in 0..conns {
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let mut hist = histogram();
                let (mut ok, mut errors) = (0u64, 0u64);
                loop {
                    let sent = Instant::now();
                    if sent >= window.end {
                        break;
                    }
                    let mut bytes = 0;
                    let result = tokio::time::timeout(
                        EXCHANGE_TIMEOUT,
                        conn.exchange(&request, |d| bytes += d.len()),
                    )
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                    if result.is_err() {
                        conn.reset();
                    }
                    let done = Instant::now();
                    let counted = done >= window.start && done <= window.end;
                    match result {
                        Ok(200) if bytes > 0 => {
                            if counted {
                                ok += 1;
                                hist.saturating_record(micros(done - sent));
                            }
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                        }
                        _ => {
                            if counted {
                                errors += 1;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (hist, ok, errors)
            }));
        }
        let mut out = Fixed {
            requests: 0,
            errors: 0,
            seconds: (window.end - window.start).as_secs_f64(),
            latency: histogram(),
        };
        for task in tasks {
            let (hist, ok, errors) = task.await.expect("load task");
            out.latency.add(hist).expect("same bounds");
            out.requests += ok;
            out.errors += errors;
        }
        out
    }
}

#[derive(Debug)]
pub struct Streams {
    pub requests: u64,
    pub failed: u64,
    pub chunks_expected: u64,
    pub chunks_received: u64,
    /// Request written to first chunk read, µs.
    pub first_chunk: Histogram<u64>,
    /// Chunk read minus the time the mock wrote it, µs.
    pub lag: Histogram<u64>,
}

impl Streams {
    fn empty() -> Self {
        Streams {
            requests: 0,
            failed: 0,
            chunks_expected: 0,
            chunks_received: 0,
            first_chunk: histogram(),
            lag: histogram(),
        }
    }
}

/// Counts the chat chunks in an SSE byte stream and times each against the
/// send time the mock embedded in it.
#[derive(Default)]
struct SseTally {
    pending: Vec<u8>,
    chunks: u64,
    done: bool,
    lags: Vec<u64>,
}

impl SseTally {
    fn feed(&mut self, data: &[u8], received_ns: u128) {
        self.pending.extend_from_slice(data);
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event = &self.pending[..end];
            if event.starts_with(b"data: [DONE]") {
                self.done = true;
            } else if let Some(sent) = sent_ns(event) {
                self.chunks += 1;
                let lag = received_ns.saturating_sub(sent) / 1000;
                self.lags.push(lag as u64);
            }
            self.pending.drain(..end + 2);
        }
    }
}

/// The mock's send time in an event: its `"t"` field, or, where a gateway
/// dropped that, the ` @<ns>` of its content.
fn sent_ns(event: &[u8]) -> Option<u128> {
    let field = event
        .windows(4)
        .rposition(|w| w == b"\"t\":")
        .map(|at| at + 4);
    let content = || event.windows(2).rposition(|w| w == b" @").map(|at| at + 2);
    let at = field.or_else(content)?;
    let digits = event[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&event[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// `concurrent` connections, each running SSE requests of `chunks` chunks
/// `interval_ms` apart back to back until `duration` has passed (at least
/// one each).
pub fn streams(
    addr: SocketAddr,
    shape: &Shape,
    concurrent: usize,
    chunks: u64,
    interval_ms: u64,
    duration: Duration,
) -> impl std::future::Future<Output = Streams> + 'static {
    let request: Arc<[u8]> = shaped_request(addr, Some((chunks, interval_ms)), shape).into();
    async move {
        let end = Instant::now() + duration;
        let mut tasks = Vec::with_capacity(concurrent);
        for _ in 0..concurrent {
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let mut out = Streams::empty();
                loop {
                    let sent = Instant::now();
                    let mut tally = SseTally::default();
                    let mut first = None;
                    let exchange = conn.exchange(&request, |d| {
                        first.get_or_insert_with(Instant::now);
                        tally.feed(d, now_ns());
                    });
                    let bound = EXCHANGE_TIMEOUT + Duration::from_millis(chunks * interval_ms);
                    let result = tokio::time::timeout(bound, exchange)
                        .await
                        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                    if result.is_err() {
                        conn.reset();
                    }
                    out.requests += 1;
                    out.chunks_expected += chunks;
                    out.chunks_received += tally.chunks;
                    if !matches!(result, Ok(200)) || !tally.done || tally.chunks != chunks {
                        out.failed += 1;
                    }
                    if let Some(first) = first {
                        out.first_chunk.saturating_record(micros(first - sent));
                    }
                    for lag in tally.lags {
                        out.lag.saturating_record(lag.max(1));
                    }
                    if Instant::now() >= end {
                        break;
                    }
                }
                out
            }));
        }
        let mut total = Streams::empty();
        for task in tasks {
            let s = task.await.expect("stream task");
            total.requests += s.requests;
            total.failed += s.failed;
            total.chunks_expected += s.chunks_expected;
            total.chunks_received += s.chunks_received;
            total.first_chunk.add(s.first_chunk).expect("same bounds");
            total.lag.add(s.lag).expect("same bounds");
        }
        total
    }
}

/// Streams held open (one chunk a second) until dropped.
pub struct Held {
    stop: watch::Sender<bool>,
    pub ready: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Held {
    pub fn new() -> Self {
        Held {
            stop: watch::channel(false).0,
            ready: Arc::default(),
            failed: Arc::default(),
            tasks: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Opens `n` more streams, at most 128 connecting at once, and waits
    /// (up to `patience`) until each has its first chunk or has failed.
    pub async fn open(&mut self, addr: SocketAddr, shape: &Shape, n: usize, patience: Duration) {
        let request: Arc<[u8]> = shaped_request(addr, Some((0, 1000)), shape).into();
        let connecting = Arc::new(Semaphore::new(128));
        let target = self.tasks.len() + n;
        let deadline = Instant::now() + patience;
        for i in 0..n {
            // A proxy that stops answering must not stall the run for good:
            // the streams not opened by the deadline count as failed.
            let Ok(permit) =
                tokio::time::timeout_at(deadline, connecting.clone().acquire_owned()).await
            else {
                self.failed.fetch_add((n - i) as u64, Ordering::Relaxed);
                break;
            };
            let permit = permit.expect("open");
            let request = request.clone();
            let (ready, failed) = (self.ready.clone(), self.failed.clone());
            let mut stop = self.stop.subscribe();
            self.tasks.push(tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let mut permit = Some(permit);
                let mut first = true;
                let mut tally = SseTally::default();
                let exchange = conn.exchange(&request, |d| {
                    tally.feed(d, 0);
                    tally.lags.clear();
                    if first && tally.chunks > 0 {
                        first = false;
                        ready.fetch_add(1, Ordering::Relaxed);
                        permit.take();
                    }
                });
                tokio::select! {
                    _ = exchange => {
                        // An open-ended stream never ends by itself.
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ = stop.wait_for(|s| *s) => {}
                }
            }));
        }
        while self.settled() < target as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn settled(&self) -> u64 {
        self.ready.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }

    /// Closes every stream, and waits for the tasks to end.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_split_events() {
        let mut t = SseTally::default();
        let a = b"data: {\"x\":1,\"t\":1000000}\n\ndata: {\"t\":2000";
        t.feed(a, 3_000_000);
        assert_eq!((t.chunks, t.lags.clone()), (1, vec![2000]));
        t.feed(b"000}\n\ndata: [DONE]\n\n", 4_000_000);
        assert_eq!(
            (t.chunks, t.lags.clone(), t.done),
            (2, vec![2000, 2000], true)
        );
        // Re-serialised without "t": the time in the content still counts.
        let mut t = SseTally::default();
        t.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\" @1000000\"}}]}\n\n",
            3_000_000,
        );
        t.feed(b"data: {\"choices\":[{\"delta\":{}}]}\n\n", 3_000_000);
        assert_eq!((t.chunks, t.lags.clone()), (1, vec![2000]));
    }
}
