//! The access log: one info line per request, written when the response body
//! is dropped (so it knows how many bytes went out and how the body ended).
//! It carries no header values and no body, so no key can reach it.
//!
//! The line is the one tracing-subscriber's formatter would write for an
//! info event in the request span, built here by hand: on the proxy's hot
//! path the generic formatter cost more than a quarter of all instructions
//! per request (see BENCHMARKS.md). Filtering still goes through tracing
//! (`RUST_LOG=sluice::access=off` silences it); other events are untouched.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, StatusCode};

use crate::config::{LogFormat, Route};
use crate::metrics::RouteMetrics;
use crate::response::StreamFailure;

/// How the response body ended, as far as the client is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Dropped before its end: the client went away (or the server stopped).
    Unfinished,
    Complete,
    /// Cut after the headers: an SSE error event, or an abort.
    Failed(StreamFailure),
}

impl BodyEnd {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unfinished => "client_gone",
            Self::Complete => "complete",
            Self::Failed(why) => why.code(),
        }
    }
}

/// The request's tracing span, made on first use. Most requests log
/// nothing but their access line, which names the id itself, and a span
/// per request (made, entered and left on every poll) cost about a tenth of
/// the proxy's instructions.
#[derive(Debug)]
pub struct RequestSpan {
    id: HeaderValue,
    span: OnceLock<tracing::Span>,
}

impl RequestSpan {
    /// The span to give as `parent:` to an event about this request.
    pub fn get(&self) -> &tracing::Span {
        // The target is the proxy's, as before this span was made lazily:
        // `sluice::access=off` silences the access line, not the request id
        // on warnings. No parent: whatever span is current at first use is
        // not this request's.
        self.span.get_or_init(|| {
            tracing::info_span!(target: "sluice::proxy", parent: None, "request", id = self.id())
        })
    }

    pub fn id(&self) -> &str {
        self.id.to_str().unwrap_or("-")
    }
}

/// What one request did; logged on drop.
#[derive(Debug)]
pub struct AccessLog {
    pub span: RequestSpan,
    pub start: Instant,
    /// Start to end, read once when the request ends (for the metric and the line).
    duration: Option<Duration>,
    pub method: Method,
    /// The client's path (the query is not logged: it may carry secrets).
    /// A copy: a stream's record lives as long as the stream, and a slice
    /// of the request would keep hyper's whole 8 KiB read buffer with it.
    pub path: Box<str>,
    pub route: Option<Arc<Route>>,
    /// None until a response exists; logged as 499 (nginx's "client closed request").
    pub status: Option<StatusCode>,
    pub attempts: u32,
    pub ttfb: Option<Duration>,
    pub bytes_out: u64,
    pub end: BodyEnd,
    /// sluice's own error code, when sluice answered.
    pub error: Option<&'static str>,
    /// The retry budget refused a retry.
    pub budget_exhausted: bool,
    /// The upstream's own `x-request-id`, if it sent one.
    pub upstream_request_id: Option<String>,
    /// The route's in-flight slot: released when this record drops, that
    /// is when the response ends or the client leaves.
    pub in_flight: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The route's metric handles (or the unrouted ones).
    pub metrics: Option<Arc<RouteMetrics>>,
}

impl AccessLog {
    pub fn new(id: HeaderValue, start: Instant, method: Method, path: &str) -> Self {
        Self {
            span: RequestSpan {
                id,
                span: OnceLock::new(),
            },
            start,
            duration: None,
            method,
            path: path.into(),
            route: None,
            status: None,
            attempts: 0,
            ttfb: None,
            bytes_out: 0,
            end: BodyEnd::Unfinished,
            error: None,
            budget_exhausted: false,
            upstream_request_id: None,
            in_flight: None,
            metrics: None,
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let duration = self.start.elapsed();
        self.duration = Some(duration);
        if let Some(m) = &self.metrics {
            m.request(self.status.map_or(499, |s| s.as_u16()));
            m.duration.observe(duration.as_secs_f64());
            if self.route.is_some() {
                m.in_flight.dec();
            }
            match self.end {
                BodyEnd::Failed(why) => m.stream_abort(why.code()),
                BodyEnd::Unfinished if self.status.is_some() => m.stream_abort("client_gone"),
                _ => {}
            }
        }
        if tracing::enabled!(target: "sluice::access", tracing::Level::INFO) {
            self.write_line();
        }
    }
}

/// The `[log] format` the access line is written in.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
}

thread_local! {
    /// Access lines not yet written, one buffer per worker thread.
    static LINES: RefCell<String> = RefCell::new(String::with_capacity(512));
    /// Whether this thread writes its lines in batches (see `flush_lines`).
    static BATCHING: Cell<bool> = const { Cell::new(false) };
    /// The second of the oldest line held.
    static HELD_SINCE: Cell<u64> = const { Cell::new(0) };
}

/// Most bytes of access lines a thread holds before it writes them.
const BATCH_MAX: usize = 32 * 1024;

/// Writes the access lines this thread holds, and from then on lets it
/// batch them. The runtime calls this each time a worker thread is about to
/// wait for events: a busy proxy writes each turn's lines in one `write`
/// instead of one per request, and an idle one holds none back. Called at
/// exit too; lines are lost only if the process dies abruptly mid-turn.
pub fn flush_lines() {
    let _ = BATCHING.try_with(|b| b.set(true));
    let _ = LINES.try_with(|lines| {
        if let Ok(mut lines) = lines.try_borrow_mut() {
            write_out(&mut lines);
        }
    });
}

/// Writes the lines this thread holds and stops batching on it: for the
/// end of the process, where lines may still come (tasks dropped with the
/// runtime) but no turn follows to write them.
pub fn stop_batching() {
    flush_lines();
    let _ = BATCHING.try_with(|b| b.set(false));
}

fn write_out(lines: &mut String) {
    if lines.is_empty() {
        return;
    }
    let _ = std::io::stderr().lock().write_all(lines.as_bytes());
    lines.clear();
    if lines.capacity() > 2 * BATCH_MAX {
        lines.shrink_to(BATCH_MAX);
    }
}

impl AccessLog {
    fn write_line(&self) {
        let Some(&format) = FORMAT.get() else {
            // No `logging::init` (sluice as a library, or the in-process
            // tests): an ordinary event for whatever subscriber there is.
            return self.event();
        };
        let _ = LINES.try_with(|lines| {
            let Ok(mut lines) = lines.try_borrow_mut() else {
                return;
            };
            let now = SystemTime::now();
            let second = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if lines.is_empty() {
                let _ = HELD_SINCE.try_with(|h| h.set(second));
            }
            match format {
                LogFormat::Json => self.json(&mut lines, now),
                LogFormat::Text => self.text(&mut lines, now),
            }
            lines.push('\n');
            // A thread outside the runtime's batching writes at once; a
            // worker that never goes idle writes at least each second.
            let batching = BATCHING.try_with(Cell::get).unwrap_or(false);
            let stale = HELD_SINCE.try_with(Cell::get).is_ok_and(|h| h != second);
            if !batching || stale || lines.len() >= BATCH_MAX {
                write_out(&mut lines);
            }
        });
    }

    fn event(&self) {
        let f = self.fields();
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: "sluice::access",
            parent: self.span.get(),
            method = %self.method,
            path = f.path,
            route = f.route,
            upstream = f.upstream,
            status = f.status,
            attempts = self.attempts,
            duration_ms = ms(f.duration),
            ttfb_ms = self.ttfb.map(ms),
            bytes_out = self.bytes_out,
            body = self.end.as_str(),
            error = self.error,
            budget_exhausted = self.budget_exhausted,
            upstream_request_id = self.upstream_request_id.as_deref(),
            "request"
        );
    }

    fn fields(&self) -> Fields<'_> {
        let route = self.route.as_deref();
        Fields {
            id: self.span.id(),
            path: &self.path,
            route: route.map_or("-", |r| r.name.as_str()),
            upstream: route.map_or("-", |r| r.upstream.name.as_str()),
            status: self.status.map_or(499, |s| s.as_u16()),
            duration: self.duration.unwrap_or_else(|| self.start.elapsed()),
        }
    }

    /// `2026-01-01T00:00:00.000000Z  INFO request{id="..."}: sluice::access: request k=v ...`
    fn text(&self, out: &mut String, now: SystemTime) {
        let f = self.fields();
        timestamp(out, now);
        out.push_str("  INFO ");
        // The span's part, where the filter lets the request span through.
        if span_enabled() {
            out.push_str("request{id=");
            debug_str(out, f.id);
            out.push_str("}: ");
        }
        out.push_str("sluice::access: request method=");
        out.push_str(self.method.as_str());
        out.push_str(" path=");
        debug_str(out, f.path);
        out.push_str(" route=");
        debug_str(out, f.route);
        out.push_str(" upstream=");
        debug_str(out, f.upstream);
        out.push_str(" status=");
        num(out, f.status);
        out.push_str(" attempts=");
        num(out, self.attempts);
        out.push_str(" duration_ms=");
        millis(out, f.duration);
        if let Some(t) = self.ttfb {
            out.push_str(" ttfb_ms=");
            millis(out, t);
        }
        out.push_str(" bytes_out=");
        num(out, self.bytes_out);
        out.push_str(" body=\"");
        out.push_str(self.end.as_str());
        out.push('"');
        if let Some(e) = self.error {
            out.push_str(" error=\"");
            out.push_str(e);
            out.push('"');
        }
        out.push_str(" budget_exhausted=");
        out.push_str(if self.budget_exhausted {
            "true"
        } else {
            "false"
        });
        if let Some(id) = &self.upstream_request_id {
            out.push_str(" upstream_request_id=");
            debug_str(out, id);
        }
    }

    /// The same fields as tracing-subscriber's flattened JSON.
    fn json(&self, out: &mut String, now: SystemTime) {
        let f = self.fields();
        out.push_str("{\"timestamp\":\"");
        timestamp(out, now);
        out.push_str("\",\"level\":\"INFO\",\"message\":\"request\",\"method\":");
        json_str(out, self.method.as_str());
        out.push_str(",\"path\":");
        json_str(out, f.path);
        out.push_str(",\"route\":");
        json_str(out, f.route);
        out.push_str(",\"upstream\":");
        json_str(out, f.upstream);
        out.push_str(",\"status\":");
        num(out, f.status);
        out.push_str(",\"attempts\":");
        num(out, self.attempts);
        out.push_str(",\"duration_ms\":");
        millis(out, f.duration);
        if let Some(t) = self.ttfb {
            out.push_str(",\"ttfb_ms\":");
            millis(out, t);
        }
        out.push_str(",\"bytes_out\":");
        num(out, self.bytes_out);
        out.push_str(",\"body\":\"");
        out.push_str(self.end.as_str());
        out.push('"');
        if let Some(e) = self.error {
            out.push_str(",\"error\":\"");
            out.push_str(e);
            out.push('"');
        }
        out.push_str(",\"budget_exhausted\":");
        out.push_str(if self.budget_exhausted {
            "true"
        } else {
            "false"
        });
        if let Some(id) = &self.upstream_request_id {
            out.push_str(",\"upstream_request_id\":");
            json_str(out, id);
        }
        out.push_str(",\"target\":\"sluice::access\"");
        if span_enabled() {
            out.push_str(",\"span\":{\"id\":");
            json_str(out, f.id);
            out.push_str(",\"name\":\"request\"},\"spans\":[]");
        }
        out.push('}');
    }
}

/// Whether the filter lets the `request` span through (as `RequestSpan`
/// makes it).
fn span_enabled() -> bool {
    tracing::enabled!(target: "sluice::proxy", tracing::Level::INFO)
}

struct Fields<'a> {
    id: &'a str,
    path: &'a str,
    route: &'a str,
    upstream: &'a str,
    status: u16,
    duration: Duration,
}

/// Milliseconds with microsecond precision, as a float would print:
/// `88.195`, `0.5`, `12.0`.
fn millis(out: &mut String, d: Duration) {
    // u64 arithmetic: u128 division is a library call.
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    num(out, us / 1000);
    out.push('.');
    let digits = [(us / 100 % 10) as u8, (us / 10 % 10) as u8, (us % 10) as u8];
    let last = digits.iter().rposition(|&d| d != 0).unwrap_or(0);
    for d in &digits[..=last] {
        out.push(char::from(b'0' + d));
    }
}

/// RFC 3339 UTC with microseconds, as tracing-subscriber writes it. The
/// part up to the seconds is formatted once a second per thread.
fn timestamp(out: &mut String, t: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let cached = SECOND.try_with(|cell| {
        let mut second = cell.borrow_mut();
        if second.0 != secs {
            second.1.clear();
            date_time(&mut second.1, secs);
            second.0 = secs;
        }
        out.push_str(&second.1);
    });
    if cached.is_err() {
        date_time(out, secs);
    }
    out.push('.');
    padded(out, u64::from(since.subsec_micros()), 6);
    out.push('Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` after the epoch.
fn date_time(out: &mut String, secs: u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, for days >= 0).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    padded(out, year, 4);
    out.push('-');
    padded(out, month, 2);
    out.push('-');
    padded(out, day, 2);
    out.push('T');
    padded(out, rem / 3600, 2);
    out.push(':');
    padded(out, rem / 60 % 60, 2);
    out.push(':');
    padded(out, rem % 60, 2);
}

/// An integer in decimal, without the formatting machinery.
fn num(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `n` in decimal, zero-padded to `width` digits.
fn padded(out: &mut String, n: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// A string as `{:?}` prints it, without the formatting machinery for the
/// common case of nothing to escape.
fn debug_str(out: &mut String, s: &str) {
    if needs_escape(s.as_bytes()) {
        let _ = write!(out, "{s:?}");
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

/// Whether `s` holds a byte that `{:?}` would not print as is: a control
/// byte, DEL, a non-ASCII byte, `"` or `\\`. Eight bytes at a time, with the
/// classic "has a byte less than n" word tricks.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let mut words = s.chunks_exact(8);
    let escape_in_word = words.by_ref().any(|w| {
        let w = u64::from_le_bytes(<[u8; 8]>::try_from(w).unwrap_or([0; 8]));
        w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0
            || w & HIGH != 0
            || has_zero(w ^ (ONES * 0x7f))
            || has_zero(w ^ (ONES * u64::from(b'"')))
            || has_zero(w ^ (ONES * u64::from(b'\\')))
    });
    escape_in_word
        || words
            .remainder()
            .iter()
            .any(|&b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\')
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut s = String::new();
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_763_790_130_071_632);
        timestamp(&mut s, t);
        assert_eq!(s, "2025-11-22T05:42:10.071632Z");
        s.clear();
        timestamp(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400),
        );
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn millis_print_like_floats() {
        let p = |us| {
            let mut s = String::new();
            millis(&mut s, Duration::from_micros(us));
            s
        };
        assert_eq!(p(88_195), "88.195");
        assert_eq!(p(101_740), "101.74");
        assert_eq!(p(12_000), "12.0");
        assert_eq!(p(7), "0.007");
    }

    #[test]
    fn the_word_scan_agrees_with_the_byte_rule() {
        let plain = |b: u8| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut chunk = *b"abcdefgh";
                chunk[at] = b;
                assert_eq!(needs_escape(&chunk), !plain(b), "byte {b:#x} at {at}");
                assert_eq!(
                    needs_escape(&chunk[..=at]),
                    !plain(b),
                    "byte {b:#x}, {at} long"
                );
            }
        }
        assert!(!needs_escape(b""));
    }

    /// A line goes out at once on a thread that does not batch, and is held
    /// until `flush_lines` on one that does (a runtime worker).
    #[test]
    fn lines_are_held_only_on_batching_threads() {
        set_format(LogFormat::Text);
        let record = |path: &str| {
            let log = AccessLog::new(
                HeaderValue::from_static("id-1"),
                Instant::now(),
                Method::GET,
                path,
            );
            log.write_line();
            std::mem::forget(log);
        };
        let held = |needle: &str| LINES.with(|l| l.borrow().contains(needle));
        std::thread::spawn(move || {
            record("/at-once");
            assert!(!held("/at-once"), "written at once");
            flush_lines();
            record("/batched-1");
            record("/batched-2");
            assert!(
                held("/batched-1") && held("/batched-2"),
                "held for the batch"
            );
            flush_lines();
            assert!(!held("/batched"), "written by the flush");
            // Lines held since an earlier second go out with the next one.
            record("/old");
            HELD_SINCE.with(|h| h.set(h.get() - 1));
            record("/new");
            assert!(!held("/old") && !held("/new"), "written within a second");
            stop_batching();
            record("/after-stop");
            assert!(!held("/after-stop"), "written at once after stop_batching");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        debug_str(&mut s, "a\"b\n");
        json_str(&mut s, "a\"b\\\u{1}é");
        assert_eq!(s, r#""a\"b\n""a\"b\\\u0001é""#);
    }
}
