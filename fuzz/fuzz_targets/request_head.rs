//! sluice's HTTP/1.1 server's request parser (`server::h1::parse`) on any
//! bytes. It must never panic, and a request it takes must have taken no
//! more than the buffer, with a body exactly as long as the one
//! `content-length` it read: anything else would leave the next request's
//! start in this one's body, or this one's end in the next (smuggling).
//!
//! The first byte picks the body limit and whether the body read failed
//! (timed out or closed early); the rest is what the client sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::fuzz::{parse_request, RequestParse};
use sluice::http1;
use sluice::server::{BodyError, ClientBody};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, buf)) = data.split_first() else {
        return;
    };
    let max_body = match ctl & 0b11 {
        0 => 0,
        1 => 16,
        2 => 1024 * 1024,
        _ => u64::MAX,
    };
    let failed = match (ctl >> 2) & 0b11 {
        1 => Some(BodyError::TimedOut),
        2 => Some(BodyError::Incomplete),
        _ => None,
    };
    match parse_request(buf, max_body, failed) {
        RequestParse::Ready { req, close, used } => {
            assert!(used <= buf.len(), "took {used} of {} bytes", buf.len());
            let headers = req.headers();
            // Only plain-length requests are this server's: never a coded one.
            assert!(!headers.contains_key(http::header::TRANSFER_ENCODING));
            let length = http1::content_length(headers)
                .expect("a request taken has no invalid or conflicting content-length");
            assert!(
                headers.get_all(http::header::CONTENT_LENGTH).iter().count() <= 1,
                "a repeated content-length is hyper's to judge"
            );
            let n = length.unwrap_or(0);
            assert!(n <= max_body, "a body over the limit is not read whole");
            match req.body() {
                ClientBody::Full(None) => assert_eq!(n, 0),
                ClientBody::Full(Some(body)) => {
                    assert_eq!(body.len() as u64, n, "the body is the length it said");
                    assert_eq!(
                        &buf[used - body.len()..used],
                        &body[..],
                        "and ends where it took"
                    );
                }
                ClientBody::Failed(e) => {
                    assert_eq!(Some(*e), failed, "only a failed read fails a body");
                    assert!(close, "a broken body ends the connection");
                    assert_eq!(used, buf.len());
                }
                ClientBody::Hyper(_) => panic!("a body read whole is never hyper's"),
            }
        }
        RequestParse::Body(total) => {
            assert!(total > buf.len(), "a body awaited is not all there");
            assert!(failed.is_none(), "a failed read is answered, not awaited");
        }
        RequestParse::Partial | RequestParse::Hyper | RequestParse::Refused(_) => {}
    }
});
