//! What the differential tests of both codecs generate: the header lines
//! that make framing ambiguous or a head malformed, and bodies, valid or
//! broken. Test-only.

use proptest::prelude::*;

/// Header lines that a reader may take two ways, or must refuse.
const MUTATED: &[&str] = &[
    "Content-Length: 5, 5",
    "Content-Length: +5",
    "Content-Length: -1",
    "Content-Length: 99999999999999999999",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: Chunked",
    "transfer-encoding:chunked",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, gzip",
    "Transfer-Encoding: gzip",
    "Transfer-Encoding: identity",
    "Transfer-Encoding: xchunked",
    "Transfer-Encoding : chunked",
    "X-Fold: a\r\n b",
    "X-Nul: a\0b",
    "X-Cr: a\rb",
    "Expect: 100-continue",
    "Connection: close",
];

/// A header line: mostly `plain` ones and valid lengths, sometimes a mutation.
pub fn header(plain: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(plain).prop_map(str::to_owned),
        6 => (0u64..40).prop_map(|n| format!("Content-Length: {n}")),
        6 => proptest::sample::select(MUTATED).prop_map(str::to_owned),
    ]
}

/// A body: raw bytes, or a chunked one (valid, with an extension and a
/// trailer, with a size past u64, or without its CRLF).
pub fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        "[a-z]{0,20}".prop_map(|s| format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len()).into_bytes()),
        Just(b"ffffffffffffffffff\r\nx\r\n0\r\n\r\n".to_vec()),
        Just(b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n".to_vec()),
        Just(b"5\r\nhelloXX0\r\n\r\n".to_vec()),
    ]
}

/// Ends a message: an `eol` after each line, then a blank one, the body,
/// maybe cut short at `cut`.
pub fn assemble(
    start: &str,
    headers: &[String],
    lf_only: bool,
    body: &[u8],
    cut: Option<proptest::sample::Index>,
) -> Vec<u8> {
    let eol = if lf_only { "\n" } else { "\r\n" };
    let mut out = format!("{start}{eol}").into_bytes();
    for h in headers {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(eol.as_bytes());
    }
    out.extend_from_slice(eol.as_bytes());
    out.extend_from_slice(body);
    if let Some(at) = cut {
        out.truncate(at.index(out.len() + 1));
    }
    out
}

/// Cases per property: 256, or `PROPTEST_CASES`.
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}
