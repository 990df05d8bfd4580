//! The OpenAI dialect: what OpenAI's API and its SDKs say and read.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{ErrorInfo, Provider};

/// Client key headers: OpenAI's, Azure's and Anthropic's (a client may send
/// any of them through an OpenAI-compatible route).
pub(super) static CLIENT_KEYS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
];

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
static X_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static X_REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static X_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
/// The OpenAI (and Anthropic) SDKs obey it.
pub(super) static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

#[derive(Debug)]
pub struct OpenAi;

impl Provider for OpenAi {
    fn client_key_headers(&self) -> &'static [HeaderName] {
        &CLIENT_KEYS
    }

    fn wait_hint(
        &self,
        headers: &HeaderMap,
        status: StatusCode,
        now: SystemTime,
    ) -> Option<Duration> {
        hint(headers, status, now)
    }

    fn is_quota_exhausted(&self, encoding: Option<&[u8]>, body: &[u8]) -> bool {
        is_insufficient_quota(encoding, body)
    }

    /// `{"error":{"message","type","param":null,"code"}}`. Every part is a
    /// constant of ours, so nothing needs escaping.
    fn error_body(&self, e: ErrorInfo) -> Bytes {
        Bytes::from(error_json(e))
    }

    /// `data: {"error":...}` and a blank line; preceded by a blank line when
    /// the upstream stopped inside an event. The SDKs raise `APIError` on it
    /// while iterating.
    fn sse_error_event(&self, e: ErrorInfo, at_boundary: bool) -> Bytes {
        let lead = if at_boundary { "" } else { "\n\n" };
        Bytes::from(format!("{lead}data: {}\n\n", error_json(e)))
    }

    fn rate_limit_headers(&self, h: &mut HeaderMap, wait: Duration, limit: u32) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        h.insert(X_LIMIT.clone(), HeaderValue::from(limit));
        h.insert(X_REMAINING.clone(), HeaderValue::from_static("0"));
        let reset = HeaderValue::from_str(&format_go_duration(wait)).expect("ASCII");
        h.insert(X_RESET.clone(), reset);
    }

    fn token_limit_headers(&self, h: &mut HeaderMap, r: super::TokenRefusal) {
        super::retry_after(h, r.wait);
        h.insert(X_LIMIT_TOKENS.clone(), HeaderValue::from(r.limit));
        h.insert(X_REMAINING_TOKENS.clone(), HeaderValue::from(r.remaining));
        let reset = HeaderValue::from_str(&format_go_duration(r.reset)).expect("ASCII");
        h.insert(X_RESET_TOKENS.clone(), reset);
    }

    /// A comment line: every SSE client skips it.
    fn sse_keepalive(&self) -> Bytes {
        Bytes::from_static(b": keep-alive\n")
    }

    fn forbid_client_retry(&self, h: &mut HeaderMap) {
        h.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
}

fn error_json(e: ErrorInfo) -> String {
    format!(
        r#"{{"error":{{"message":"{}","type":"{}","param":null,"code":"{}"}}}}"#,
        e.message, e.kind, e.code
    )
}

/// How long the upstream asks to wait: `retry-after-ms`, else `Retry-After`
/// (seconds or an HTTP date), else for a 429 OpenAI's
/// `x-ratelimit-reset-requests`/`-tokens` for whichever limit is exhausted.
pub(crate) fn hint(headers: &HeaderMap, status: StatusCode, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        // try_from: an absurd value must not panic (panic = "abort" in release).
        if let Ok(d) = Duration::try_from_secs_f64(ms / 1000.0) {
            return Some(d);
        }
    }
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let reset = |name: &str| text(name).and_then(go_duration);
    let exhausted = |name: &str| text(name) == Some("0");
    let (req, tok) = (
        reset("x-ratelimit-reset-requests"),
        reset("x-ratelimit-reset-tokens"),
    );
    match (
        exhausted("x-ratelimit-remaining-requests"),
        exhausted("x-ratelimit-remaining-tokens"),
    ) {
        (true, true) => req.max(tok),
        (true, false) => req,
        (false, true) => tok,
        // No limit says which: wait for the later reset to be safe.
        (false, false) => req.max(tok),
    }
}

/// How long a response says its rate limit stays used up: the reset of a
/// limit whose `x-ratelimit-remaining-*` is 0 (the later of the two).
pub fn used_up_for(headers: &HeaderMap) -> Option<Duration> {
    // One pass over the names first: most responses have no such header
    // at 0, and looking each name up hashes it.
    let at_zero = headers.iter().any(|(name, value)| {
        name.as_str().starts_with("x-ratelimit-remaining-") && value.as_bytes().trim_ascii() == b"0"
    });
    if !at_zero {
        return None;
    }
    let text = |name: &HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let reset = |[remaining, reset]: &[HeaderName; 2]| {
        (text(remaining) == Some("0"))
            .then(|| text(reset).and_then(go_duration))
            .flatten()
    };
    reset(&RATE_LIMIT_REQUESTS).max(reset(&RATE_LIMIT_TOKENS))
}

/// OpenAI's remaining and reset headers, for requests and for tokens.
static RATE_LIMIT_REQUESTS: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
static RATE_LIMIT_TOKENS: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// Parses Go's duration format as OpenAI sends it: "6m0s", "1.5s", "120ms".
pub fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * secs;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Formats a duration as OpenAI's rate-limit headers do: "120ms", "1.2s", "6m0s".
pub fn format_go_duration(d: Duration) -> String {
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 > 0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (mins, secs) = (ms / 60_000, (ms % 60_000) as f64 / 1000.0);
    match mins {
        0 => format!("{secs}s"),
        m => format!("{m}m{secs}s"),
    }
}

/// Whether a 429's body says the account is out of quota: a billing state,
/// not a transient limit, so retrying cannot help. Bodies the SDKs asked to
/// have compressed are decoded (gzip, deflate); one in an encoding sluice
/// cannot read counts as quota too: not retrying is the safe side.
fn is_insufficient_quota(encoding: Option<&[u8]>, body: &[u8]) -> bool {
    use std::io::Read;
    let mut decoded = Vec::new();
    let body = match encoding.map(<[u8]>::to_ascii_lowercase).as_deref() {
        None | Some(b"identity") => body,
        Some(b"gzip") | Some(b"x-gzip") => {
            let limited = flate2::read::GzDecoder::new(body).take(1 << 20);
            match { limited }.read_to_end(&mut decoded) {
                Ok(_) => &decoded,
                Err(_) => return false,
            }
        }
        Some(b"deflate") => {
            let limited = flate2::read::ZlibDecoder::new(body).take(1 << 20);
            match { limited }.read_to_end(&mut decoded) {
                Ok(_) => &decoded,
                Err(_) => return false,
            }
        }
        Some(_) => return true,
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let e = &v["error"];
    e["code"] == "insufficient_quota" || e["type"] == "insufficient_quota"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openai_shape_in_json_and_in_sse() {
        let e = ErrorInfo {
            code: "route_not_found",
            kind: "invalid_request_error",
            message: "sluice: no route",
        };
        assert_eq!(
            &OpenAi.error_body(e)[..],
            br#"{"error":{"message":"sluice: no route","type":"invalid_request_error","param":null,"code":"route_not_found"}}"#
        );
        let event = OpenAi.sse_error_event(e, true);
        assert!(event.starts_with(b"data: {\"error\"") && event.ends_with(b"}}\n\n"));
        assert!(OpenAi.sse_error_event(e, false).starts_with(b"\n\ndata: "));
    }

    #[test]
    fn rate_limited_carries_openai_headers_rounded_up() {
        let mut h = HeaderMap::new();
        OpenAi.rate_limit_headers(&mut h, Duration::from_millis(1200), 60);
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "1.2s");
        OpenAi.rate_limit_headers(&mut h, Duration::from_millis(80), 60);
        assert_eq!(h["retry-after"], "1");
    }

    #[test]
    fn hints_in_order_of_precedence() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let s429 = StatusCode::TOO_MANY_REQUESTS;
        assert_eq!(
            hint(&h(&[("retry-after-ms", "1500")]), s429, now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            hint(&h(&[("retry-after", "7")]), s429, now),
            Some(Duration::from_secs(7))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            hint(&h(&[("retry-after", &date)]), s429, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            hint(&h(&[("retry-after", &past)]), s429, now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            hint(
                &h(&[("retry-after-ms", "20"), ("retry-after", "9")]),
                s429,
                now
            ),
            Some(Duration::from_millis(20))
        );
        let openai = h(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-remaining-tokens", "1000"),
            ("x-ratelimit-reset-tokens", "120ms"),
        ]);
        assert_eq!(hint(&openai, s429, now), Some(Duration::from_secs(360)));
        // Reset headers mean nothing on a 503.
        assert_eq!(hint(&openai, StatusCode::SERVICE_UNAVAILABLE, now), None);
        assert_eq!(hint(&h(&[("retry-after", "soon")]), s429, now), None);
        for absurd in ["1e30", "-5", "NaN", "inf"] {
            assert_eq!(
                hint(&h(&[("retry-after-ms", absurd)]), s429, now),
                None,
                "{absurd}"
            );
        }
    }

    #[test]
    fn go_durations_format_and_parse_back() {
        for (d, text) in [
            (120, "120ms"),
            (1200, "1.2s"),
            (360_000, "6m0s"),
            (61_500, "1m1.5s"),
        ] {
            let d = Duration::from_millis(d);
            assert_eq!(format_go_duration(d), text);
            assert_eq!(go_duration(text), Some(d));
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("120ms"), Some(Duration::from_millis(120)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(go_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "5", "5x", "s", "1..2s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn insufficient_quota_is_recognised() {
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert!(is_insufficient_quota(None, quota));
        let limit = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert!(!is_insufficient_quota(None, limit));
        assert!(!is_insufficient_quota(None, b"not json"));
        // Compressed as the SDKs' accept-encoding allows.
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(quota).unwrap();
        assert!(is_insufficient_quota(Some(b"gzip"), &gz.finish().unwrap()));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(limit).unwrap();
        assert!(!is_insufficient_quota(Some(b"GZIP"), &gz.finish().unwrap()));
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(quota).unwrap();
        assert!(is_insufficient_quota(
            Some(b"deflate"),
            &z.finish().unwrap()
        ));
        assert!(is_insufficient_quota(Some(b"br"), b"\x0b\x02"));
    }
}
