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
use crate::usage::{Framing, Strip, Tap};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body sent to the client.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    timer: Option<Timer>,
    sse: bool,
    /// Whether what went out so far ends on an SSE event boundary.
    at_boundary: bool,
    /// Reads the body's usage (and removes the chunk sluice asked for).
    watch: Option<Box<Watch>>,
    keepalive: Option<Box<KeepAlive>>,
    ctx: RequestCtx,
}

/// What is read of a passing body for its usage.
#[derive(Debug)]
pub struct Watch {
    tap: Tap,
    /// Set when sluice added `include_usage`: its chunk is removed.
    strip: Option<Strip>,
}

impl Watch {
    pub fn new(framing: Framing, strip: bool) -> Box<Self> {
        Box::new(Self {
            tap: Tap::new(framing),
            strip: strip.then(Strip::default),
        })
    }

    /// What of `data` goes on now.
    fn frame(&mut self, data: Bytes) -> Bytes {
        self.tap.frame(&data);
        match &mut self.strip {
            Some(s) => s.frame(data),
            None => data,
        }
    }

    /// Whether it removes sluice's usage chunk (so changes the length).
    pub fn strips(&self) -> bool {
        self.strip.is_some()
    }

    /// Whether it holds bytes still owed to the client.
    fn holds(&self) -> bool {
        self.strip.as_ref().is_some_and(Strip::holds)
    }
}

/// `[routes.sse] keepalive`: a comment after this much silence towards the
/// client, at event boundaries only. Its own timer: the upstream's idle
/// clock never sees these.
#[derive(Debug)]
struct KeepAlive {
    every: Duration,
    ping: Bytes,
    /// When the client last got bytes (read when the body first waits after them).
    quiet_since: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
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
        watch: Option<Box<Watch>>,
    ) -> Self {
        let timer = Timer {
            waits: None,
            drain: drain.clone(),
            last_frame: None,
            expiry: None,
        };
        let keepalive = match ctx.route().and_then(|r| r.route.sse_keepalive) {
            Some(every) if sse => Some(Box::new(KeepAlive {
                every,
                ping: ctx.provider().sse_keepalive(),
                quiet_since: None,
                sleep: None,
            })),
            _ => None,
        };
        Self {
            inner: Inner::Upstream { head, body },
            timer: Some(timer),
            sse,
            at_boundary: true,
            watch,
            keepalive,
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
            watch: None,
            keepalive: None,
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

    /// Bytes of the upstream's went to the client.
    fn sent(&mut self, d: &Bytes) {
        self.ctx.bytes_out += d.len() as u64;
        if let Some(t) = &mut self.ctx.trace {
            if !d.is_empty() {
                t.first_chunk(d);
            }
        }
        if self.sse && !d.is_empty() {
            self.at_boundary = d.ends_with(b"\n\n") || d.ends_with(b"\r\n\r\n");
            if let Some(m) = &mut self.ctx.model {
                m.first_bytes();
            }
            if let Some(k) = &mut self.keepalive {
                k.quiet_since = None;
                // The stream's last event went out: nothing to keep alive.
                if is_last_event(d) {
                    self.keepalive = None;
                }
            }
        }
    }

    /// The body ended (or was dropped): its usage goes to the context.
    fn end_watch(&mut self) {
        if let Some(w) = self.watch.take() {
            self.ctx.usage = w.tap.end();
        }
    }

    /// A keep-alive comment, when the client has heard nothing for
    /// `keepalive` and the stream is between events.
    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Option<Bytes> {
        let k = self.keepalive.as_mut()?;
        if !self.at_boundary {
            return None;
        }
        let at = *k.quiet_since.get_or_insert_with(Instant::now) + k.every;
        let sleep = k
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        // The next one after another `every` of silence.
        k.quiet_since = Some(Instant::now());
        Some(k.ping.clone())
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
        loop {
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
                            if let Some(why) = this.poll_timer(cx) {
                                return this.fail(why, cx);
                            }
                            return match this.poll_keepalive(cx) {
                                Some(ping) => {
                                    this.ctx.bytes_out += ping.len() as u64;
                                    Poll::Ready(Some(Ok(Frame::data(ping))))
                                }
                                None => Poll::Pending,
                            };
                        }
                    },
                },
            };
            return match frame {
                Some(Ok(f)) => {
                    let f = match f.into_data() {
                        Ok(mut d) => {
                            if let Some(w) = &mut this.watch {
                                let sent = d.is_empty();
                                d = w.frame(d);
                                // All of it held back (the start of an event): read on.
                                if d.is_empty() && !sent {
                                    if let Some(t) = &mut this.timer {
                                        t.last_frame = None;
                                    }
                                    continue;
                                }
                            }
                            this.sent(&d);
                            Frame::data(d)
                        }
                        Err(f) => f,
                    };
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
                    // An event the upstream left without its blank line.
                    let held = this
                        .watch
                        .as_mut()
                        .and_then(|w| w.strip.as_mut())
                        .map(Strip::end);
                    this.end_watch();
                    match held {
                        Some(d) if !d.is_empty() => {
                            this.sent(&d);
                            Poll::Ready(Some(Ok(Frame::data(d))))
                        }
                        _ => Poll::Ready(None),
                    }
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Done => true,
            Inner::Failed(_) => false,
            Inner::Full(d) => d.is_none(),
            // Not final while a failure event could still be owed.
            Inner::Upstream { head, body } => {
                head.is_empty()
                    && body.is_end_stream()
                    && !self.watch.as_ref().is_some_and(|w| w.holds())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Done => SizeHint::with_exact(0),
            Inner::Failed(_) => SizeHint::default(),
            Inner::Full(d) => whole_hint(d),
            // A chunk removed, keep-alives added: not the upstream's length.
            Inner::Upstream { .. }
                if self.keepalive.is_some() || self.watch.as_ref().is_some_and(|w| w.strips()) =>
            {
                SizeHint::default()
            }
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

/// Whether `d` ends with a stream's last event: OpenAI's `[DONE]` or
/// Anthropic's `message_stop`.
fn is_last_event(d: &[u8]) -> bool {
    let d = d.trim_ascii_end();
    d.ends_with(b"data: [DONE]") || d.ends_with(b"data:[DONE]") || d.ends_with(b"\"message_stop\"}")
}

/// A wake far enough off never to come (about thirty years).
const FAR: Duration = Duration::from_secs(1 << 30);

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The server may stop polling once is_end_stream() is true.
        if self.ctx.end == BodyEnd::Unfinished && self.is_end_stream() {
            self.ctx.end = BodyEnd::Complete;
        }
        self.end_watch();
        self.ctx.finish();
    }
}
