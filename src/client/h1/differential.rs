//! Differential test of the response reader against hyper's client: for
//! generated responses, valid and mutated (repeated and conflicting
//! lengths, transfer-coding spellings, obs-fold, bare CR and LF, NUL, chunk
//! sizes past u64, interim responses, truncation), a response this client
//! reads as complete hyper reads as complete too, with the same status and
//! the same body bytes. Where this client refuses what hyper takes, sluice
//! is stricter on purpose (a transfer coding other than one `chunked`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{parse_head, Decoded, Decoder};
use crate::http1::mutations::{assemble, body, config, header};

/// A complete response: its status and body.
type Read = Option<(u16, Bytes)>;

/// This client's reading of `input` as the answer to a GET or a HEAD, the
/// connection closing after it.
fn ours(input: &[u8], head_only: bool) -> Read {
    let mut buf = BytesMut::from(input);
    let head = parse_head(&mut buf, head_only).ok()??;
    let mut decoder = Decoder::new(head.framing);
    let mut body = BytesMut::new();
    loop {
        match decoder.decode(&mut buf).ok()? {
            Decoded::Data(d) => body.extend_from_slice(&d),
            Decoded::End => return Some((head.res.status().as_u16(), body.freeze())),
            Decoded::More => {
                decoder.at_eof().ok()?;
                return Some((head.res.status().as_u16(), body.freeze()));
            }
        }
    }
}

fn theirs(rt: &tokio::runtime::Runtime, input: &[u8], head_only: bool) -> Read {
    let input = input.to_vec();
    rt.block_on(async move {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let upstream = tokio::spawn(async move {
            let mut head = [0u8; 1024];
            let _ = server.read(&mut head).await;
            let _ = server.write_all(&input).await;
            let _ = server.shutdown().await;
            // Keep the read side open until the client is done.
            let _ = server.read(&mut head).await;
        });
        let read = async {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            let method = if head_only { "HEAD" } else { "GET" };
            let req = http::Request::builder()
                .method(method)
                .uri("/")
                .header("host", "x")
                .body(http_body_util::Empty::<Bytes>::new())
                .ok()?;
            let res = send.send_request(req).await.ok()?;
            let status = res.status().as_u16();
            let body = res.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        };
        let read = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .ok()
            .flatten();
        upstream.abort();
        read
    })
}

prop_compose! {
    fn response()(
        status in prop_oneof![Just(200u16), Just(200), Just(204), Just(304), Just(404), Just(500)],
        interim in proptest::bool::weighted(0.1),
        headers in proptest::collection::vec(header(&["Content-Type: text/event-stream", "X-Plain: yes"]), 0..4),
        lf_only in proptest::bool::weighted(0.1),
        body in body(),
        cut in proptest::option::weighted(0.2, any::<proptest::sample::Index>()),
    ) -> Vec<u8> {
        let start = format!("HTTP/1.1 {status} X");
        let mut out = if interim { b"HTTP/1.1 100 Continue\r\n\r\n".to_vec() } else { Vec::new() };
        out.extend(assemble(&start, &headers, lf_only, &body, cut));
        out
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn complete_responses_are_read_as_hyper_reads_them(input in response(), head_only in proptest::bool::weighted(0.1)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        if let Some((status, body)) = ours(&input, head_only) {
            let hyper = theirs(&rt, &input, head_only);
            prop_assert_eq!(
                hyper.clone(),
                Some((status, body)),
                "sluice read {:?} differently from hyper",
                String::from_utf8_lossy(&input)
            );
        }
    }
}
