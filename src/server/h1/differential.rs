//! Differential test of the request parser against hyper's server: for
//! generated request heads and bodies, valid and mutated (repeated and
//! conflicting lengths, transfer-coding spellings, obs-fold, bare CR and
//! LF, NUL, chunk sizes past u64, truncation, pipelining), what this
//! server accepts hyper accepts too, with the same method, path and body,
//! and the next request starts where both say it does. What this server
//! refuses hyper does not accept as a whole request either, except where
//! sluice is stricter on purpose (listed below).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{parse, Parse};
use crate::http1::mutations::{assemble, body, config, header};

const MAX_BODY: u64 = 1024 * 1024;

/// What hyper made of the bytes: each request's method, path and body
/// (`None` when the body broke off).
type Seen = Vec<(String, String, Option<Bytes>)>;

fn hyper_reads(rt: &tokio::runtime::Runtime, input: &[u8]) -> Seen {
    let input = input.to_vec();
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let seen = Arc::new(Mutex::new(Seen::new()));
        let log = seen.clone();
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let log = log.clone();
            async move {
                let method = req.method().to_string();
                let path = req
                    .uri()
                    .path_and_query()
                    .map_or("", |p| p.as_str())
                    .to_owned();
                let body = req.into_body().collect().await.ok().map(|c| c.to_bytes());
                log.lock().unwrap().push((method, path, body));
                Ok::<_, std::convert::Infallible>(http::Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            // The input ends with a FIN: the requests before it still count.
            .half_close(true)
            .max_buf_size(super::super::MAX_HEAD_BYTES.max(8192))
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let served = tokio::spawn(conn);
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut out)).await;
        served.abort();
        let seen = seen.lock().unwrap().clone();
        seen
    })
}

prop_compose! {
    fn request()(
        method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("HEAD"), Just("DELETE")],
        path in "/[a-z0-9/._%-]{0,16}",
        version in prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.1"), Just("HTTP/1.0")],
        headers in proptest::collection::vec(header(&["Host: x", "X-Plain: yes"]), 0..5),
        lf_only in proptest::bool::weighted(0.1),
        body in body(),
        next in proptest::bool::weighted(0.3),
        cut in proptest::option::weighted(0.2, any::<proptest::sample::Index>()),
    ) -> Vec<u8> {
        let mut body = body;
        if next {
            body.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        assemble(&format!("{method} {path} {version}"), &headers, lf_only, &body, cut)
    }
}

/// Where sluice refuses on purpose what hyper takes (RFC 9112 allows both):
/// a body framed by both lengths, or by a coding list hyper reads as
/// chunked-last.
fn stricter_on_purpose(input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input).to_ascii_lowercase();
    text.contains("transfer-encoding")
}

/// One input: what sluice's parser accepts, hyper reads the same way.
fn agrees_with_hyper(input: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = hyper_reads(&rt, input);
    match parse(input, MAX_BODY, None) {
        Parse::Ready(parsed, used) => {
            let (method, path, body) = seen.first().cloned().unwrap_or_else(|| {
                panic!(
                    "sluice accepted what hyper did not: {:?}",
                    String::from_utf8_lossy(input)
                )
            });
            prop_assert_eq!(parsed.req.method().as_str(), method.as_str());
            prop_assert_eq!(
                parsed.req.uri().path_and_query().map_or("", |p| p.as_str()),
                path.as_str()
            );
            let ours = match parsed.req.body() {
                crate::server::ClientBody::Full(b) => b.clone().unwrap_or_default(),
                other => panic!("{other:?}"),
            };
            prop_assert_eq!(Some(ours), body);
            // The next message starts at the same place for both (unless
            // the first asked to close: then neither reads on).
            let closes = parsed
                .req
                .headers()
                .get_all(http::header::CONNECTION)
                .iter()
                .any(|v| {
                    v.to_str()
                        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
                });
            if closes {
                return Ok(());
            }
            if let Parse::Ready(next, _) = parse(&input[used..], MAX_BODY, None) {
                let theirs = seen.get(1).map(|s| s.1.as_str());
                prop_assert_eq!(next.req.uri().path_and_query().map(|p| p.as_str()), theirs);
            }
        }
        Parse::Refuse(_) if stricter_on_purpose(input) => {}
        Parse::Refuse(why) => {
            let whole = seen.first().is_some_and(|s| s.2.is_some());
            prop_assert!(
                !whole,
                "sluice refused ({:?}) what hyper accepted: {:?} as {:?}",
                why,
                String::from_utf8_lossy(input),
                seen
            );
        }
        Parse::Partial => {
            prop_assert!(seen.is_empty(), "an incomplete head hyper read: {:?}", seen)
        }
        Parse::Body(_) | Parse::Hyper => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn accepted_requests_are_read_as_hyper_reads_them(input in request()) {
        agrees_with_hyper(&input)?;
    }
}

/// Found by the property: a request that asks to close, followed by
/// another. Neither server reads the second.
#[test]
fn a_request_that_closes_is_the_last_either_reads() {
    let input = b"GET / HTTP/1.1\r\nConnection: close\r\nContent-Length: 10\r\n\r\n0\r\n\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n";
    agrees_with_hyper(input).unwrap();
}
