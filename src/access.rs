//! The access log: one info line per request, formatted and written here;
//! the request context (`proxy/ctx.rs`) hands over a [`Record`] when the
//! request ends (when its response body is dropped, so it knows how many
//! bytes went out and how the body ended). A record carries no header value
//! and no body, so no key can reach it.
//!
//! The line is the one tracing-subscriber's formatter would write for an
//! info event in the request span, built here by hand: on the proxy's hot
//! path the generic formatter was among the largest costs of a request
//! (BENCHMARKS.md). Filtering still goes through tracing
//! (`RUST_LOG=sluice::access=off` silences it); other events are untouched.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method};

use crate::config::LogFormat;

/// The request's tracing span, made on first use. Most requests log
/// nothing but their access line, which names the id itself, and a span
/// made, entered and left on every poll of every request is a real cost.
#[derive(Debug)]
pub struct RequestSpan {
    id: HeaderValue,
    span: OnceLock<tracing::Span>,
}

impl RequestSpan {
    pub fn new(id: HeaderValue) -> Self {
        Self {
            id,
            span: OnceLock::new(),
        }
    }

    /// The request id as a header value.
    pub fn id_value(&self) -> &HeaderValue {
        &self.id
    }

    /// The span to give as `parent:` to an event about this request.
    pub fn get(&self) -> &tracing::Span {
        // The target is the proxy's: `sluice::access=off` silences the
        // access line, not the request id on warnings. No parent: whatever span is current at first use is
        // not this request's.
        self.span.get_or_init(|| {
            tracing::info_span!(target: "sluice::proxy", parent: None, "request", id = self.id())
        })
    }

    pub fn id(&self) -> &str {
        self.id.to_str().unwrap_or("-")
    }
}

/// What one request did, as the access line says it.
#[derive(Debug)]
pub struct Record<'a> {
    pub span: &'a RequestSpan,
    pub method: &'a Method,
    /// The client's path (the query is not logged: it may carry secrets).
    pub path: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    /// 499 (nginx's "client closed request") when no response existed.
    pub status: u16,
    pub attempts: u32,
    pub duration: Duration,
    pub ttfb: Option<Duration>,
    pub bytes_out: u64,
    /// How the body ended: `complete`, `client_gone`, or a failure code.
    pub body: &'static str,
    /// sluice's own error code, when sluice answered.
    pub error: Option<&'static str>,
    /// The retry budget refused a retry.
    pub budget_exhausted: bool,
    /// The upstream's own `x-request-id`, if it sent one.
    pub upstream_request_id: Option<&'a str>,
    /// A model-routed request's part.
    pub model: Option<ModelRecord<'a>>,
    /// Tokens in and out, and where they came from (`reported`,
    /// `estimated`); `None` when usage was not looked for.
    pub tokens: Option<TokenRecord>,
}

/// What the line says of a request's tokens.
#[derive(Debug, Clone, Copy)]
pub struct TokenRecord {
    pub input: Option<u64>,
    pub output: Option<u64>,
    /// `reported`, `estimated` or `none`.
    pub source: &'static str,
}

/// What a model-routed request's line adds.
#[derive(Debug)]
pub struct ModelRecord<'a> {
    /// The model the client named.
    pub model: &'a str,
    /// The last attempt's `upstream/model`.
    pub deployment: &'a str,
    /// Every attempt: `upstream/model:status` (or the outcome word), by commas.
    pub trail: &'a str,
    pub fallbacks: u32,
}

/// Writes the access line of `record`, if the filter lets it through.
pub fn write(record: &Record<'_>) {
    if tracing::enabled!(target: "sluice::access", tracing::Level::INFO) {
        record.write_line();
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

impl Record<'_> {
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
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: "sluice::access",
            parent: self.span.get(),
            method = %self.method,
            path = self.path,
            route = self.route,
            upstream = self.upstream,
            status = self.status,
            attempts = self.attempts,
            duration_ms = ms(self.duration),
            ttfb_ms = self.ttfb.map(ms),
            bytes_out = self.bytes_out,
            body = self.body,
            error = self.error,
            budget_exhausted = self.budget_exhausted,
            upstream_request_id = self.upstream_request_id,
            model = self.model.as_ref().map(|m| m.model),
            deployment = self.model.as_ref().map(|m| m.deployment),
            trail = self.model.as_ref().map(|m| m.trail),
            fallbacks = self.model.as_ref().map(|m| m.fallbacks),
            tokens_in = self.tokens.and_then(|t| t.input),
            tokens_out = self.tokens.and_then(|t| t.output),
            usage = self.tokens.map(|t| t.source),
            "request"
        );
    }

    /// `2026-01-01T00:00:00.000000Z  INFO request{id="..."}: sluice::access: request k=v ...`
    fn text(&self, out: &mut String, now: SystemTime) {
        timestamp(out, now);
        out.push_str("  INFO ");
        // The span's part, where the filter lets the request span through.
        if span_enabled() {
            out.push_str("request{id=");
            debug_str(out, self.span.id());
            out.push_str("}: ");
        }
        out.push_str("sluice::access: request");
        self.fields(&mut Text(out));
    }

    /// The same fields as tracing-subscriber's flattened JSON.
    fn json(&self, out: &mut String, now: SystemTime) {
        out.push_str("{\"timestamp\":\"");
        timestamp(out, now);
        out.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
        self.fields(&mut Json(out));
        out.push_str(",\"target\":\"sluice::access\"");
        if span_enabled() {
            out.push_str(",\"span\":{\"id\":");
            json_str(out, self.span.id());
            out.push_str(",\"name\":\"request\"},\"spans\":[]");
        }
        out.push('}');
    }

    /// The fields in order, for either format.
    fn fields(&self, f: &mut impl Fields) {
        f.plain("method", self.method.as_str());
        f.string("path", self.path);
        f.string("route", self.route);
        f.string("upstream", self.upstream);
        f.num("status", self.status.into());
        f.num("attempts", self.attempts.into());
        f.millis("duration_ms", self.duration);
        if let Some(t) = self.ttfb {
            f.millis("ttfb_ms", t);
        }
        f.num("bytes_out", self.bytes_out);
        f.word("body", self.body);
        if let Some(e) = self.error {
            f.word("error", e);
        }
        f.raw(
            "budget_exhausted",
            if self.budget_exhausted {
                "true"
            } else {
                "false"
            },
        );
        if let Some(id) = self.upstream_request_id {
            f.string("upstream_request_id", id);
        }
        if let Some(m) = &self.model {
            f.string("model", m.model);
            f.string("deployment", m.deployment);
            f.string("trail", m.trail);
            f.num("fallbacks", m.fallbacks.into());
        }
        if let Some(t) = &self.tokens {
            if let Some(n) = t.input {
                f.num("tokens_in", n);
            }
            if let Some(n) = t.output {
                f.num("tokens_out", n);
            }
            f.word("usage", t.source);
        }
    }
}

/// Where the fields of a line go: ` key=value` text or `,"key":value` JSON.
trait Fields {
    /// Starts field `key` and returns the line.
    fn key(&mut self, key: &str) -> &mut String;
    /// A value of ours that needs no quotes in text (the method).
    fn plain(&mut self, key: &str, value: &str);
    /// Any string, quoted and escaped.
    fn string(&mut self, key: &str, value: &str);

    /// A fixed word of ours: quoted, nothing to escape.
    fn word(&mut self, key: &str, value: &'static str) {
        let out = self.key(key);
        out.push('"');
        out.push_str(value);
        out.push('"');
    }

    /// A number, a boolean: as is in either format.
    fn raw(&mut self, key: &str, value: &str) {
        self.key(key).push_str(value);
    }

    fn num(&mut self, key: &str, n: u64) {
        num(self.key(key), n);
    }

    fn millis(&mut self, key: &str, d: Duration) {
        millis(self.key(key), d);
    }
}

struct Text<'a>(&'a mut String);
struct Json<'a>(&'a mut String);

impl Fields for Text<'_> {
    fn key(&mut self, key: &str) -> &mut String {
        self.0.push(' ');
        self.0.push_str(key);
        self.0.push('=');
        self.0
    }

    fn plain(&mut self, key: &str, value: &str) {
        self.key(key).push_str(value);
    }

    fn string(&mut self, key: &str, value: &str) {
        debug_str(self.key(key), value);
    }
}

impl Fields for Json<'_> {
    fn key(&mut self, key: &str) -> &mut String {
        self.0.push_str(",\"");
        self.0.push_str(key);
        self.0.push_str("\":");
        self.0
    }

    fn plain(&mut self, key: &str, value: &str) {
        self.string(key, value);
    }

    fn string(&mut self, key: &str, value: &str) {
        json_str(self.key(key), value);
    }
}

/// Whether the filter lets the `request` span through (as `RequestSpan`
/// makes it).
fn span_enabled() -> bool {
    tracing::enabled!(target: "sluice::proxy", tracing::Level::INFO)
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
            let span = RequestSpan::new(HeaderValue::from_static("id-1"));
            Record {
                span: &span,
                method: &Method::GET,
                path,
                route: "-",
                upstream: "-",
                status: 200,
                attempts: 1,
                duration: Duration::from_millis(3),
                ttfb: None,
                bytes_out: 0,
                body: "complete",
                error: None,
                budget_exhausted: false,
                upstream_request_id: None,
                model: None,
                tokens: None,
            }
            .write_line();
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
    fn text_and_json_lines_carry_the_same_fields() {
        let span = RequestSpan::new(HeaderValue::from_static("id-1"));
        let r = Record {
            span: &span,
            method: &Method::POST,
            path: "/v1/\"x\"",
            route: "chat",
            upstream: "openai",
            status: 429,
            attempts: 2,
            duration: Duration::from_micros(12_500),
            ttfb: Some(Duration::from_micros(7)),
            bytes_out: 99,
            body: "complete",
            error: Some("rate_limit_exceeded"),
            budget_exhausted: true,
            upstream_request_id: Some("req_1"),
            model: None,
            tokens: None,
        };
        let mut text = String::new();
        r.fields(&mut Text(&mut text));
        assert_eq!(
            text,
            r#" method=POST path="/v1/\"x\"" route="chat" upstream="openai" status=429 attempts=2 duration_ms=12.5 ttfb_ms=0.007 bytes_out=99 body="complete" error="rate_limit_exceeded" budget_exhausted=true upstream_request_id="req_1""#
        );
        let mut json = String::from("{\"a\":1");
        r.fields(&mut Json(&mut json));
        json.push('}');
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/v1/\"x\"");
        assert_eq!(v["status"], 429);
        assert_eq!(v["duration_ms"], 12.5);
        assert_eq!(v["ttfb_ms"], 0.007);
        assert_eq!(v["error"], "rate_limit_exceeded");
        assert_eq!(v["budget_exhausted"], true);
        assert_eq!(v["upstream_request_id"], "req_1");
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        debug_str(&mut s, "a\"b\n");
        json_str(&mut s, "a\"b\\\u{1}é");
        assert_eq!(s, r#""a\"b\n""a\"b\\\u0001é""#);
    }
}
