//! Retry policy pieces the proxy's attempt loop uses: which outcomes are
//! retried, how long to wait (full-jitter backoff and the upstream's hints),
//! and the per-route retry budget (`budget.rs`).

mod budget;

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

pub use budget::Budget;

/// `rand(0, min(max, base * 2^retry))`, with `retry` counted from 0: full
/// jitter spreads synchronized clients apart (AWS architecture blog).
pub fn backoff(base: Duration, max: Duration, retry: u32, rng: &mut fastrand::Rng) -> Duration {
    let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
    let cap = base.saturating_mul(factor).min(max);
    let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=cap_ns))
}

/// How long the upstream asks to wait: `retry-after-ms`, else `Retry-After`
/// (seconds or an HTTP date), else for a 429 OpenAI's
/// `x-ratelimit-reset-requests`/`-tokens` for whichever limit is exhausted.
pub fn hint(headers: &HeaderMap, status: StatusCode, now: SystemTime) -> Option<Duration> {
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
    let reset = |kind: &str| text(&format!("x-ratelimit-reset-{kind}")).and_then(go_duration);
    let exhausted = |kind: &str| text(&format!("x-ratelimit-remaining-{kind}")) == Some("0");
    let (req, tok) = (reset("requests"), reset("tokens"));
    match (exhausted("requests"), exhausted("tokens")) {
        (true, true) => req.max(tok),
        (true, false) => req,
        (false, true) => tok,
        // No limit says which: wait for the later reset to be safe.
        (false, false) => req.max(tok),
    }
}

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
pub fn is_insufficient_quota(encoding: Option<&[u8]>, body: &[u8]) -> bool {
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
    fn backoff_stays_within_full_jitter_bounds_at_every_step() {
        let (base, max) = (Duration::from_millis(250), Duration::from_secs(8));
        let mut rng = fastrand::Rng::with_seed(7);
        for retry in 0..40 {
            let cap = (base * 2u32.saturating_pow(retry.min(20))).min(max);
            let mut seen_high = false;
            for _ in 0..2000 {
                let d = backoff(base, max, retry, &mut rng);
                assert!(d <= cap, "retry {retry}: {d:?} > {cap:?}");
                seen_high |= d > cap / 2;
            }
            // Full jitter uses the whole range, not just its bottom.
            assert!(seen_high, "retry {retry}: never above half the cap");
        }
        // A zero base means no wait at all.
        assert_eq!(backoff(Duration::ZERO, max, 3, &mut rng), Duration::ZERO);
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
