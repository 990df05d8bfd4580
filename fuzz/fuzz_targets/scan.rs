//! The JSON body scanner (`sluice::scan::Scanner`) on any bytes, fed whole
//! and fed in three pieces split at points the input picks. It must never
//! panic, and answer the same either way: where a read happens to end must
//! not change which fields were found, where, or whether the body is
//! refused. When serde_json reads the bytes as an object, the scanner must
//! accept them too (unless a watched key repeats) and each value it found
//! must be the one serde_json read for that key.
//!
//! The first four bytes pick the two splits; the rest is the body.

#![no_main]

use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use sluice::scan::{Field, Fields, ScanError, Scanner};

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    result: Result<(), ScanError>,
    spans: Vec<Option<Range<u64>>>,
    done: bool,
}

fn scan(parts: &[&[u8]]) -> Outcome {
    let mut s = Scanner::new(Fields::all());
    let mut result = Ok(());
    for p in parts {
        let r = s.feed(p);
        if result.is_err() {
            assert_eq!(r, result, "errors stick");
        }
        result = r;
    }
    if result.is_ok() {
        result = s.finish();
    }
    assert_eq!(s.finish(), result, "errors stick");
    assert_eq!(
        s.offset(),
        parts.iter().map(|p| p.len() as u64).sum::<u64>()
    );
    Outcome {
        result,
        spans: Field::ALL
            .iter()
            .map(|&f| s.span(f).map(|span| span.value.clone()))
            .collect(),
        done: s.is_done(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((split, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let a = usize::from(u16::from_le_bytes([split[0], split[1]])) % (body.len() + 1);
    let b = usize::from(u16::from_le_bytes([split[2], split[3]])) % (body.len() + 1);
    let (a, b) = (a.min(b), a.max(b));
    let whole = scan(&[body]);
    let split = scan(&[&body[..a], &body[a..b], &body[b..]]);
    assert_eq!(whole, split, "split at {a} and {b}");
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        if matches!(whole.result, Err(ScanError::Duplicate(_))) {
            return;
        }
        assert_eq!(whole.result, Ok(()), "serde_json read an object");
        for (f, span) in Field::ALL.iter().zip(&whole.spans) {
            let want = map.get(f.key());
            assert_eq!(want.is_some(), span.is_some(), "{f:?}");
            if let (Some(want), Some(span)) = (want, span) {
                let text = &body[span.start as usize..span.end as usize];
                let got: serde_json::Value = serde_json::from_slice(text).unwrap();
                assert_eq!(&got, want, "{f:?}");
            }
        }
    }
});
