//! Entry points for the fuzz targets in `fuzz/`, built only with the
//! `fuzzing` feature (never a default): thin wrappers over the parsers that
//! take bytes from a peer or a file, which are private to the crate. Not an
//! API: nothing else may call them.
//!
//! The chunked decoder ([`crate::http1::decode::Decoder`]) and
//! [`crate::Config::parse`] are public already and are fuzzed as they are.

use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use http::{HeaderMap, Request, Response, StatusCode};

use crate::client;
use crate::http1::Framing;
use crate::server::{self, BodyError, ClientBody, Refusal};

/// What the HTTP/1.1 server's request parser made of a buffer.
// As large as the parser's own answer, which it mirrors.
#[allow(clippy::large_enum_variant)]
pub enum RequestParse {
    /// The head is not complete yet.
    Partial,
    /// The head is complete; the body needs this many bytes with it.
    Body(usize),
    /// A request; `used` bytes of the buffer were taken.
    Ready {
        req: Request<ClientBody>,
        close: bool,
        used: usize,
    },
    /// Handed to hyper.
    Hyper,
    Refused(Refusal),
}

/// `server::h1::parse(buf, max_body, failed)`.
pub fn parse_request(buf: &[u8], max_body: u64, failed: Option<BodyError>) -> RequestParse {
    match server::h1::parse(buf, max_body, failed) {
        server::h1::Parse::Partial => RequestParse::Partial,
        server::h1::Parse::Body(total) => RequestParse::Body(total),
        server::h1::Parse::Ready(p, used) => RequestParse::Ready {
            req: p.req,
            close: p.close,
            used,
        },
        server::h1::Parse::Hyper => RequestParse::Hyper,
        server::h1::Parse::Refuse(why) => RequestParse::Refused(why),
    }
}

/// A response head as the upstream client reads it.
pub struct ResponseHead {
    pub res: Response<()>,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// `client::h1::parse_head(buf, head_only)`: the head is taken off `buf`.
pub fn parse_response_head(
    buf: &mut BytesMut,
    head_only: bool,
) -> Result<Option<ResponseHead>, client::Error> {
    client::h1::parse_head(buf, head_only).map(|head| {
        head.map(|h| ResponseHead {
            res: h.res,
            framing: h.framing,
            keep_alive: h.keep_alive,
        })
    })
}

/// The OpenAI dialect's wait hint for a response with `headers`.
pub fn wait_hint(headers: &HeaderMap, status: StatusCode, now: SystemTime) -> Option<Duration> {
    crate::provider::openai::hint(headers, status, now)
}

/// Go's duration format, as OpenAI's `x-ratelimit-reset-*` headers use it.
pub fn go_duration(s: &str) -> Option<Duration> {
    crate::provider::openai::go_duration(s)
}
