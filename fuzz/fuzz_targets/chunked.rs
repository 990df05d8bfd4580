//! The HTTP/1.1 body decoder (`http1::decode::Decoder`, chunked) on any
//! bytes, fed whole and fed in two pieces split at a point the input picks.
//! It must never panic, never yield more bytes than it was given, and read
//! the same body either way: where a read happens to end must not change
//! what the body is, nor where the next message starts.
//!
//! The first two bytes pick the split; the rest is the body as sent.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::http1::decode::{Decoded, Decoder};
use sluice::http1::Framing;

/// How the decoding ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The body ended; what followed it (the next message) is left.
    Done(Vec<u8>),
    /// Waiting for more bytes.
    More,
    Invalid,
}

fn decode(parts: &[&[u8]]) -> (Vec<u8>, End) {
    let mut decoder = Decoder::new(Framing::Chunked);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        buf.extend_from_slice(part);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(data)) => {
                    assert!(!data.is_empty(), "no empty frames");
                    body.extend_from_slice(&data);
                }
                Ok(Decoded::End) => {
                    assert!(decoder.is_end());
                    let mut rest = buf.to_vec();
                    parts[i + 1..]
                        .iter()
                        .for_each(|p| rest.extend_from_slice(p));
                    return (body, End::Done(rest));
                }
                Ok(Decoded::More) => break,
                Err(_) => return (body, End::Invalid),
            }
        }
    }
    (body, End::More)
}

fuzz_target!(|data: &[u8]| {
    let Some((split, input)) = data.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(u16::from_le_bytes(*split)) % (input.len() + 1);
    let (whole_body, whole_end) = decode(&[input]);
    assert!(whole_body.len() <= input.len());
    if let End::Done(rest) = &whole_end {
        // At least "0\r\n\r\n" of framing.
        assert!(whole_body.len() + rest.len() + 5 <= input.len());
        assert_eq!(&input[input.len() - rest.len()..], &rest[..]);
    }
    let (split_body, split_end) = decode(&[&input[..at], &input[at..]]);
    assert_eq!(whole_body, split_body, "split at {at}");
    assert_eq!(whole_end, split_end, "split at {at}");
});
