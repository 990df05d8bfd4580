//! The response body sent to the client.
//!
//! The upstream's frames pass through untouched, one at a time, so the
//! server's backpressure reaches the upstream and memory stays at a few
//! frames per stream. The wrapper counts bytes, enforces the route's `idle`
//! and `total` deadlines, and owns the request's context: dropping the body
//! ends the request. When the stream fails after the
//! headers went out (silence, deadline, upstream reset), an SSE stream gets
//! one last `data: {"error":...}` event and a clean end, so SDKs raise while
//! iterating; any other body is aborted (h1: no final chunk; h2: reset), so
//! a truncated body never looks complete.

use crate::http1::FramePoll;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::ctx::{BodyEnd, RequestCtx};
use crate::backend::Upstream;
use crate::body::prefixed_size_hint;
use crate::drain;
use crate::error::StreamFailure;
use crate::server::{whole_frame, whole_hint, Expiring};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body sent to the client.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    timer: Option<Timer>,
    sse: bool,
    /// Whether what went out so far ends on an SSE event boundary.
    at_boundary: bool,
    ctx: RequestCtx,
}

#[derive(Debug)]
enum Inner {
    /// A non-SSE stream that failed: the abort, given on the next poll.
    Failed(StreamFailure),
    Upstream {
        head: VecDeque<Bytes>,
        body: Upstream,
    },
    Full(Option<Bytes>),
    Done,
}

/// The idle and total deadlines of one stream. One sleep serves both: it is
/// armed for the earlier and, on waking, re-armed if frames came meanwhile
/// (cheaper than resetting a timer on every frame). Sleep and cut wait
/// are made when the body first has to wait: a body that is there at once
/// (most non-streaming answers) costs no timer. Idle time runs from when
/// the body waits on the upstream, so time the client takes to accept the
/// last frame (while nothing asks for the next) is not counted as silence.
#[derive(Debug)]
struct Timer {
    waits: Option<Waits>,
    drain: drain::Watch,
    /// When the body last began to wait; `None` once a frame has come since
    /// (the clock is read at the next wait, not per frame).
    last_frame: Option<Instant>,
    /// Made when the server first waits on the client with this body
    /// unpolled (see `Expiring`): the deadline and the cut, not idle time.
    expiry: Option<Box<Waits>>,
}

#[derive(Debug)]
struct Waits {
    sleep: Pin<Box<Sleep>>,
    /// The end of shutdown_grace.
    cut: drain::CutWait,
}

/// When a stream's timer should wake: at its idle limit or its deadline.
fn next_wake(last_frame: Instant, idle: Duration, deadline: Option<Instant>) -> Instant {
    let idle_at = last_frame + idle;
    deadline.map_or(idle_at, |d| d.min(idle_at))
}

impl ResponseBody {
    /// An upstream body (maybe with a part already read) under the
    /// request's deadlines.
    pub fn upstream(
        head: VecDeque<Bytes>,
        body: Upstream,
        sse: bool,
        drain: &drain::Watch,
        ctx: RequestCtx,
    ) -> Self {
        let timer = Timer {
            waits: None,
            drain: drain.clone(),
            last_frame: None,
            expiry: None,
        };
        Self {
            inner: Inner::Upstream { head, body },
            timer: Some(timer),
            sse,
            at_boundary: true,
            ctx,
        }
    }

    /// A body sluice wrote itself (an error).
    pub fn full(body: Bytes, ctx: RequestCtx) -> Self {
        Self {
            inner: Inner::Full(Some(body)),
            timer: None,
            sse: false,
            at_boundary: true,
            ctx,
        }
    }

    /// Ends the stream after a failure: the SSE error event, or an abort.
    fn fail(
        &mut self,
        why: StreamFailure,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Dropping the upstream body cancels the upstream request.
        self.inner = Inner::Done;
        self.timer = None;
        self.ctx.end = BodyEnd::Failed(why);
        if self.sse {
            let event = self
                .ctx
                .provider()
                .sse_error_event(why.info(), self.at_boundary);
            self.ctx.bytes_out += event.len() as u64;
            Poll::Ready(Some(Ok(Frame::data(event))))
        } else {
            // The abort comes on the next poll: hyper first flushes what it
            // holds (the head, the bytes so far). Aborting at once would drop
            // them, and a client that got no response at all may retry a
            // request the upstream already served.
            self.inner = Inner::Failed(why);
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Option<StreamFailure> {
        let timer = self.timer.as_mut()?;
        // The idle clock starts when the body first waits after a frame (or
        // after the head): the clock is read then, not on every frame.
        let last_frame = *timer.last_frame.get_or_insert_with(Instant::now);
        let (idle, deadline) = (self.ctx.deadlines.idle, self.ctx.deadlines.total);
        let wake = next_wake(last_frame, idle, deadline);
        let drain = &timer.drain;
        let waits = timer.waits.get_or_insert_with(|| Waits {
            sleep: Box::pin(tokio::time::sleep_until(wake)),
            cut: drain.cut(),
        });
        if Pin::new(&mut waits.cut).poll(cx).is_ready() {
            return Some(StreamFailure::Deadline);
        }
        loop {
            if waits.sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Some(StreamFailure::Deadline);
            }
            if now >= last_frame + idle {
                return Some(StreamFailure::IdleTimeout);
            }
            let wake = next_wake(last_frame, idle, deadline);
            waits.sleep.as_mut().reset(wake);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll<Self::Error> {
        let this = self.get_mut();
        // A fast upstream is never Pending: check the total deadline on every frame.
        if let Some(t) = &this.timer {
            let total = this.ctx.deadlines.total;
            if t.drain.is_cut() || total.is_some_and(|d| Instant::now() >= d) {
                return this.fail(StreamFailure::Deadline, cx);
            }
        }
        let frame = match &mut this.inner {
            Inner::Done => return Poll::Ready(None),
            Inner::Failed(why) => {
                let why = *why;
                this.inner = Inner::Done;
                return Poll::Ready(Some(Err(Box::new(why))));
            }
            Inner::Full(data) => whole_frame(data),
            Inner::Upstream { head, body } => match head.pop_front() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(f) => f,
                    Poll::Pending => {
                        return match this.poll_timer(cx) {
                            Some(why) => this.fail(why, cx),
                            None => Poll::Pending,
                        };
                    }
                },
            },
        };
        match frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.ctx.bytes_out += d.len() as u64;
                    if this.sse && !d.is_empty() {
                        this.at_boundary = d.ends_with(b"\n\n") || d.ends_with(b"\r\n\r\n");
                        if let Some(m) = &mut this.ctx.model {
                            m.first_bytes();
                        }
                    }
                }
                if let Some(t) = &mut this.timer {
                    t.last_frame = None;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Some(Err(e)) => {
                tracing::warn!(parent: this.ctx.span.get(), "upstream body broke off: {e}");
                this.fail(StreamFailure::UpstreamReset, cx)
            }
            None => {
                this.ctx.end = BodyEnd::Complete;
                this.inner = Inner::Done;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Done => true,
            Inner::Failed(_) => false,
            Inner::Full(d) => d.is_none(),
            // Not final while a failure event could still be owed.
            Inner::Upstream { head, body } => head.is_empty() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Done => SizeHint::with_exact(0),
            Inner::Failed(_) => SizeHint::default(),
            Inner::Full(d) => whole_hint(d),
            Inner::Upstream { head, body } => prefixed_size_hint(head, body.size_hint()),
        }
    }
}

impl Expiring for ResponseBody {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(timer) = self.timer.as_mut() else {
            // Sluice's own answers are whole and never expire.
            return Poll::Pending;
        };
        let drain = &timer.drain;
        let deadline = self.ctx.deadlines.total;
        let expiry = timer.expiry.get_or_insert_with(|| {
            // Without a total deadline only the cut ends it: a far wake.
            let at = deadline.unwrap_or_else(|| Instant::now() + FAR);
            Box::new(Waits {
                sleep: Box::pin(tokio::time::sleep_until(at)),
                cut: drain.cut(),
            })
        });
        let cut = Pin::new(&mut expiry.cut).poll(cx).is_ready();
        let due = deadline.is_some() && expiry.sleep.as_mut().poll(cx).is_ready();
        if !cut && !due {
            return Poll::Pending;
        }
        self.end(StreamFailure::Deadline);
        Poll::Ready(())
    }

    fn stalled(&mut self) {
        self.end(StreamFailure::SendTimeout);
    }
}

impl ResponseBody {
    /// Ends the body as failed with nothing more to send (the client is not
    /// reading): drops the upstream body, which cancels the upstream
    /// request; a later poll gets the abort, never a clean end.
    fn end(&mut self, why: StreamFailure) {
        self.inner = Inner::Failed(why);
        self.timer = None;
        if self.ctx.end == BodyEnd::Unfinished {
            self.ctx.end = BodyEnd::Failed(why);
        }
    }
}

/// A wake far enough off never to come (about thirty years).
const FAR: Duration = Duration::from_secs(1 << 30);

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The server may stop polling once is_end_stream() is true.
        if self.ctx.end == BodyEnd::Unfinished && self.is_end_stream() {
            self.ctx.end = BodyEnd::Complete;
        }
        self.ctx.finish();
    }
}
