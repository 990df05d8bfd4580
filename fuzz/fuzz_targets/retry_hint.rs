//! The OpenAI dialect's wait hint (`retry-after-ms`, `Retry-After`,
//! `x-ratelimit-reset-*`) and its Go-duration parser on any header values.
//! They read what an upstream sends and must never panic (sluice's release
//! build aborts on a panic), and a hint is always a finite Duration.
//!
//! The first byte picks the status (429 or 503); the rest is header lines,
//! `name: value`, as an upstream sends them.

#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use sluice::fuzz::{go_duration, wait_hint};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let status = if ctl & 1 == 0 {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut headers = HeaderMap::new();
    for line in rest.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        if let Ok(text) = value.to_str() {
            if let Some(d) = go_duration(text) {
                assert!(d.as_secs_f64().is_finite());
            }
        }
        headers.append(name, value);
    }
    // Any clock: a date in the past or the future, or the epoch.
    let now =
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(ctl >> 1) * 60 * 60 * 24 * 365);
    if let Some(d) = wait_hint(&headers, status, now) {
        assert!(d.as_secs_f64().is_finite());
    }
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = go_duration(text);
    }
});
