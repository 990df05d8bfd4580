//! The upstream client's response head parser (`client::h1::parse_head`)
//! on any bytes. It must never panic, and a head it takes must carry the
//! framing the client will be sent and nothing that contradicts it: at most
//! one `content-length`, plain digits, equal to the length it reads by, and
//! none at all when it reads the body as chunked (a response desync is a
//! length the next hop reads differently).
//!
//! The first byte says whether the request was a HEAD; the rest is what
//! the upstream sent.

#![no_main]

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use libfuzzer_sys::fuzz_target;
use sluice::fuzz::parse_response_head;
use sluice::http1::{self, Framing};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, raw)) = data.split_first() else {
        return;
    };
    let head_only = ctl & 1 == 1;
    let mut buf = BytesMut::from(raw);
    let Ok(Some(head)) = parse_response_head(&mut buf, head_only) else {
        assert!(buf.len() <= raw.len());
        return;
    };
    assert!(buf.len() < raw.len(), "a head was taken off the buffer");
    assert_eq!(&raw[raw.len() - buf.len()..], &buf[..], "and only the head");
    let headers = head.res.headers();
    let lengths: Vec<_> = headers.get_all(CONTENT_LENGTH).iter().collect();
    assert!(lengths.len() <= 1, "content-length {lengths:?}");
    if let Some(value) = lengths.first() {
        assert!(
            http1::parse_length(value.as_bytes()).is_some(),
            "content-length {value:?} is one plain number"
        );
    }
    assert!(
        !head.res.status().is_informational(),
        "1xx heads are skipped"
    );
    match head.framing {
        Framing::Chunked => {
            assert!(
                lengths.is_empty(),
                "chunked, yet content-length {lengths:?}"
            );
            assert!(http1::only_chunked(headers));
        }
        Framing::Length(n) => {
            assert_eq!(http1::content_length(headers), Ok(Some(n)));
            assert!(!headers.contains_key(TRANSFER_ENCODING));
        }
        Framing::Eof => {
            assert!(lengths.is_empty());
            assert!(
                !head.keep_alive,
                "a body read to the close ends the connection"
            );
        }
        Framing::Empty => {
            let no_body = head_only || matches!(head.res.status().as_u16(), 204 | 304);
            assert!(no_body, "only a HEAD's, 204's or 304's answer has no body");
            if head.res.status() == 204 {
                assert!(lengths.is_empty(), "a 204 has no content-length");
            }
        }
    }
});
