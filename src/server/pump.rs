//! Responses hyper writes (h2, and HTTP/1.1 requests handed to hyper). hyper
//! polls a response body only when it can send: a client that stops
//! reading leaves the body unpolled, so the body's own deadlines never
//! fire and its upstream request stays open. Here a task drives the body
//! into a one-frame channel instead, and while the channel is full it
//! watches the body's expiry (`total`, the drain's cut) and the send
//! timeout. Frames pass through as they came; memory stays at one frame in
//! the channel and one in hyper.

use crate::http1::FramePoll;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::{BoxError, Expiring};

/// A frame, the end of the body (`Ok(None)`), or why it broke.
type Msg = Result<Option<Frame<Bytes>>, BoxError>;

/// The hyper side of a pumped body.
pub struct Pumped {
    rx: mpsc::Receiver<Msg>,
    /// Bytes still to come when the length was known; hyper frames by it.
    left: Option<u64>,
    ended: bool,
}

/// The body stopped before its end (expired, or the client stalled).
#[derive(Debug)]
struct Cut;

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the response was cut")
    }
}

impl std::error::Error for Cut {}

/// Starts driving `body`; the returned body gives its frames to hyper.
pub fn pump<B>(body: B, send_timeout: Duration) -> Pumped
where
    B: Body<Data = Bytes, Error = BoxError> + Expiring + Send + Unpin + 'static,
{
    let left = body.size_hint().exact();
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(drive(body, tx, send_timeout));
    Pumped {
        rx,
        left,
        ended: false,
    }
}

async fn drive<B>(mut body: B, tx: mpsc::Sender<Msg>, send_timeout: Duration)
where
    B: Body<Data = Bytes, Error = BoxError> + Expiring + Unpin,
{
    loop {
        // The body's own timers (idle, total) run while it is polled here.
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            // The client went away (hyper dropped the response): the body
            // is dropped with this task, which cancels the upstream.
            () = tx.closed() => return,
        };
        let (msg, last) = match frame {
            None => (Ok(None), true),
            Some(Err(e)) => (Err(e), true),
            Some(Ok(frame)) => (Ok(Some(frame)), false),
        };
        if !send(&mut body, &tx, msg, send_timeout).await || last {
            return;
        }
        if body.is_end_stream() {
            send(&mut body, &tx, Ok(None), send_timeout).await;
            return;
        }
    }
}

/// Waits for room in the channel, unless the body expires or the client
/// takes nothing for `send_timeout`; whether the message went.
async fn send<B: Expiring>(
    body: &mut B,
    tx: &mpsc::Sender<Msg>,
    msg: Msg,
    send_timeout: Duration,
) -> bool {
    let permit = tokio::select! {
        biased;
        permit = tx.reserve() => permit,
        () = std::future::poll_fn(|cx| body.poll_expired(cx)) => return false,
        () = tokio::time::sleep(send_timeout) => {
            body.stalled();
            return false;
        }
    };
    match permit {
        Ok(permit) => {
            permit.send(msg);
            true
        }
        Err(_) => false,
    }
}

impl Body for Pumped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll<BoxError> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let msg = std::task::ready!(this.rx.poll_recv(cx));
        let frame = match msg {
            Some(Ok(Some(frame))) => frame,
            Some(Ok(None)) => {
                this.ended = true;
                return Poll::Ready(None);
            }
            Some(Err(e)) => {
                this.ended = true;
                return Poll::Ready(Some(Err(e)));
            }
            // The task stopped before the end: never a clean end.
            None => {
                this.ended = true;
                return Poll::Ready(Some(Err(Box::new(Cut))));
            }
        };
        if let (Some(left), Some(data)) = (this.left.as_mut(), frame.data_ref()) {
            *left = left.saturating_sub(data.len() as u64);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
