//! The response body sent to the client.
//!
//! The upstream's frames pass through untouched, one at a time, so hyper's
//! backpressure reaches the upstream and memory stays at a few frames per
//! stream. The wrapper counts bytes for the access log, and enforces the
//! route's `idle` and `total` deadlines. When the stream fails after the
//! headers went out (silence, deadline, upstream reset), an SSE stream gets
//! one last `data: {"error":...}` event and a clean end, so SDKs raise while
//! iterating; any other body is aborted (h1: no final chunk; h2: reset), so
//! a truncated body never looks complete.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use std::sync::Arc;

use crate::access::{AccessLog, BodyEnd};
use crate::body::prefixed_size_hint;
use crate::client::UpstreamBody;
use crate::cutoff::{Cutoff, CutoffWait};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a started response could not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFailure {
    IdleTimeout,
    Deadline,
    UpstreamReset,
}

impl StreamFailure {
    pub fn code(self) -> &'static str {
        match self {
            Self::IdleTimeout => "upstream_idle_timeout",
            Self::Deadline => "deadline_exceeded",
            Self::UpstreamReset => "upstream_reset",
        }
    }

    /// The final SSE event, preceded by a blank line in case the upstream
    /// stopped inside an event.
    fn sse_event(self, at_boundary: bool) -> Bytes {
        let event = match self {
            Self::IdleTimeout => concat!(
                r#"data: {"error":{"message":"sluice: the upstream sent nothing for longer than the route's idle timeout","#,
                r#""type":"proxy_error","param":null,"code":"upstream_idle_timeout"}}"#,
                "\n\n"
            ),
            Self::Deadline => concat!(
                r#"data: {"error":{"message":"sluice: a deadline was reached mid-stream (the route's total, or the shutdown grace)","#,
                r#""type":"proxy_error","param":null,"code":"deadline_exceeded"}}"#,
                "\n\n"
            ),
            Self::UpstreamReset => concat!(
                r#"data: {"error":{"message":"sluice: the upstream connection broke mid-stream","#,
                r#""type":"proxy_error","param":null,"code":"upstream_reset"}}"#,
                "\n\n"
            ),
        };
        if at_boundary {
            Bytes::from_static(event.as_bytes())
        } else {
            Bytes::from([b"\n\n", event.as_bytes()].concat())
        }
    }
}

impl std::fmt::Display for StreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for StreamFailure {}

/// The response body sent to the client.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    timer: Option<Timer>,
    sse: bool,
    /// Whether what went out so far ends on an SSE event boundary.
    at_boundary: bool,
    log: AccessLog,
}

#[derive(Debug)]
enum Inner {
    /// A non-SSE stream that failed: the abort, given on the next poll.
    Failed(StreamFailure),
    Upstream {
        head: VecDeque<Bytes>,
        body: UpstreamBody,
    },
    Full(Option<Bytes>),
    Done,
}

/// The idle and total deadlines of one stream. One sleep serves both: it is
/// armed for the earlier and, on waking, re-armed if frames came meanwhile
/// (cheaper than resetting a timer on every frame). Sleep and cutoff wait
/// are made when the body first has to wait: a body that is there at once
/// (most non-streaming answers) costs no timer. Idle time runs from when
/// the body waits on the upstream, so time the client takes to accept the
/// last frame (while nothing asks for the next) is not counted as silence.
#[derive(Debug)]
struct Timer {
    waits: Option<Waits>,
    cutoff: Arc<Cutoff>,
    idle: Duration,
    /// When the body last began to wait; `None` once a frame has come since
    /// (the clock is read at the next wait, not per frame).
    last_frame: Option<Instant>,
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct Waits {
    sleep: Pin<Box<Sleep>>,
    /// The end of shutdown_grace.
    cut: CutoffWait,
}

/// When a stream's timer should wake: at its idle limit or its deadline.
fn next_wake(last_frame: Instant, idle: Duration, deadline: Option<Instant>) -> Instant {
    let idle_at = last_frame + idle;
    deadline.map_or(idle_at, |d| d.min(idle_at))
}

impl ResponseBody {
    /// An upstream body (maybe with a part already read) under the route's deadlines.
    pub fn upstream(
        head: VecDeque<Bytes>,
        body: UpstreamBody,
        sse: bool,
        idle: Duration,
        deadline: Option<Instant>,
        cutoff: &Arc<Cutoff>,
        log: AccessLog,
    ) -> Self {
        let timer = Timer {
            waits: None,
            cutoff: cutoff.clone(),
            idle,
            last_frame: None,
            deadline,
        };
        Self {
            inner: Inner::Upstream { head, body },
            timer: Some(timer),
            sse,
            at_boundary: true,
            log,
        }
    }

    pub fn full(body: Bytes, log: AccessLog) -> Self {
        Self {
            inner: Inner::Full(Some(body)),
            timer: None,
            sse: false,
            at_boundary: true,
            log,
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
        self.log.end = BodyEnd::Failed(why);
        if self.sse {
            let event = why.sse_event(self.at_boundary);
            self.log.bytes_out += event.len() as u64;
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
        let wake = next_wake(last_frame, timer.idle, timer.deadline);
        let cutoff = &timer.cutoff;
        let waits = timer.waits.get_or_insert_with(|| Waits {
            sleep: Box::pin(tokio::time::sleep_until(wake)),
            cut: cutoff.wait(),
        });
        if Pin::new(&mut waits.cut).poll(cx).is_ready() {
            return Some(StreamFailure::Deadline);
        }
        loop {
            if waits.sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            if timer.deadline.is_some_and(|d| now >= d) {
                return Some(StreamFailure::Deadline);
            }
            if now >= last_frame + timer.idle {
                return Some(StreamFailure::IdleTimeout);
            }
            let wake = next_wake(last_frame, timer.idle, timer.deadline);
            waits.sleep.as_mut().reset(wake);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        // A fast upstream is never Pending: check the total deadline on every frame.
        if let Some(t) = &this.timer {
            if t.cutoff.fired() || t.deadline.is_some_and(|d| Instant::now() >= d) {
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
            Inner::Full(data) => data.take().map(|d| Ok(Frame::data(d))),
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
                    this.log.bytes_out += d.len() as u64;
                    if this.sse && !d.is_empty() {
                        this.at_boundary = d.ends_with(b"\n\n") || d.ends_with(b"\r\n\r\n");
                    }
                }
                if let Some(t) = &mut this.timer {
                    t.last_frame = None;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Some(Err(e)) => {
                tracing::warn!(parent: this.log.span.get(), "upstream body broke off: {e}");
                this.fail(StreamFailure::UpstreamReset, cx)
            }
            None => {
                this.log.end = BodyEnd::Complete;
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
            Inner::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Upstream { head, body } => prefixed_size_hint(head, body.size_hint()),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper may stop polling once is_end_stream() is true.
        if self.log.end == BodyEnd::Unfinished && self.is_end_stream() {
            self.log.end = BodyEnd::Complete;
        }
    }
}
