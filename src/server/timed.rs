//! A client connection whose writes must make progress: nginx's
//! `send_timeout`. A write (or flush) that has been waiting on the client
//! for longer than the timeout fails with `TimedOut`, and the server closes
//! the connection, which drops the response and with it the upstream
//! request. Without it a client that stops reading would hold its upstream
//! connection and its in-flight slot for as long as it stays connected.
//!
//! The timer is made when a write first has to wait and dropped when one
//! makes progress: a connection whose writes go straight out keeps none.

use std::future::Future as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub struct Timed<IO> {
    io: IO,
    limit: Duration,
    /// Armed while writes wait on the client.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> Timed<IO> {
    pub fn new(io: IO, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// Passes a write's outcome through, timing how long it waits.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "send_timeout: the client read nothing for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Timed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Timed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Whether an error is a send timeout.
pub fn is_send_timeout(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails_after_the_limit() {
        let (a, _b) = tokio::io::duplex(16);
        let mut t = Timed::new(a, Duration::from_secs(60));
        let start = Instant::now();
        let err = t.write_all(&[0u8; 64]).await.unwrap_err();
        assert!(is_send_timeout(&err));
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_restarts_the_clock() {
        let (a, mut b) = tokio::io::duplex(16);
        let mut t = Timed::new(a, Duration::from_secs(60));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            let mut chunk = [0u8; 16];
            // Takes 16 bytes every 50 s: slower than the data, faster than the limit.
            while got.len() < 64 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                let n = b.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            got.len()
        });
        t.write_all(&[7u8; 64]).await.unwrap();
        assert!(t.stalled.is_none(), "no timer once writes go out");
        assert_eq!(reader.await.unwrap(), 64);
    }
}
