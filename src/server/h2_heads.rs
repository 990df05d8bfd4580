//! The time an HTTP/2 client may take over a request head, bounded as
//! `header_read_timeout` bounds it on HTTP/1.1. A head is a HEADERS frame
//! and the CONTINUATION frames that follow it until END_HEADERS; nothing
//! else may come on the connection meanwhile, so a client that trickles
//! CONTINUATION frames holds the connection (and its memory) for as long
//! as it likes. hyper has no such bound: this wrapper reads the frame
//! headers as the bytes go by (it never decodes a payload) and fails the
//! read once a head has been open longer than the limit; hyper then closes
//! the connection.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The client connection preface, before the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

pub struct H2Heads<IO> {
    io: IO,
    limit: Duration,
    frames: Frames,
    /// Armed while a head is open.
    open: Option<(Instant, Pin<Box<Sleep>>)>,
}

/// Where in the frame stream the bytes read so far end.
#[derive(Debug, Default)]
struct Frames {
    preface_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    in_head: bool,
}

impl Frames {
    fn new() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            ..Self::default()
        }
    }

    /// Follows the frame headers in `bytes`, the next bytes read.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                n
            } else if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                n
            } else {
                let n = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                if self.header_len == FRAME_HEADER_LEN {
                    self.frame();
                }
                n
            };
            bytes = &bytes[n..];
        }
    }

    /// A whole frame header has been read.
    fn frame(&mut self) {
        let h = self.header;
        self.header_len = 0;
        self.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        match kind {
            HEADERS | PUSH_PROMISE => self.in_head = flags & END_HEADERS == 0,
            CONTINUATION if flags & END_HEADERS != 0 => self.in_head = false,
            _ => {}
        }
    }
}

impl<IO> H2Heads<IO> {
    pub fn new(io: IO, limit: Duration) -> Self {
        Self {
            io,
            limit,
            frames: Frames::new(),
            open: None,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for H2Heads<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.frames.observe(&buf.filled()[before..]);
        }
        if !this.frames.in_head {
            this.open = None;
            return polled;
        }
        let limit = this.limit;
        let (since, sleep) = this.open.get_or_insert_with(|| {
            let now = Instant::now();
            (now, Box::pin(tokio::time::sleep_until(now + limit)))
        });
        let expired = match polled {
            // A trickle keeps data coming: the clock, not a wake, decides.
            Poll::Ready(Ok(())) => Instant::now() >= *since + limit,
            _ => sleep.as_mut().poll(cx).is_ready(),
        };
        if expired {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "an HTTP/2 request head took longer than header_read_timeout",
            )));
        }
        polled
    }
}

write_through!(H2Heads);

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.resize(FRAME_HEADER_LEN + len, 0xAB);
        f
    }

    #[test]
    fn a_head_is_open_from_headers_to_end_headers_at_any_split() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend(frame(0x4, 0, 6)); // SETTINGS
        let settings_end = stream.len();
        stream.extend(frame(HEADERS, 0, 5));
        stream.extend(frame(CONTINUATION, 0, 3));
        stream.extend(frame(CONTINUATION, END_HEADERS, 2));
        // Open from the end of the HEADERS frame's header to the end of the
        // last CONTINUATION's header (before its 2 payload bytes).
        let opens = settings_end + FRAME_HEADER_LEN;
        let closes = stream.len() - 2;
        stream.extend(frame(0x0, 0x1, 300)); // DATA, END_STREAM
        for cut in 0..stream.len() {
            let mut f = Frames::new();
            f.observe(&stream[..cut]);
            assert_eq!(f.in_head, (opens..closes).contains(&cut), "cut at {cut}");
            f.observe(&stream[cut..]);
            assert!(!f.in_head, "closed at the end, cut at {cut}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_fails_the_read_after_the_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1024);
        let mut server = H2Heads::new(server, Duration::from_secs(10));
        let mut client = client;
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        client.write_all(&frame(HEADERS, 0, 4)).await.unwrap();
        let start = Instant::now();
        let trickle = tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(&frame(CONTINUATION, 0, 1)).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = [0u8; 256];
        let err = loop {
            match server.read(&mut buf).await {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took <= Duration::from_secs(11),
            "{took:?}"
        );
        trickle.abort();
    }
}
