//! Request bodies: up to `retry_buffer` bytes are collected so an attempt can
//! be replayed; a larger body streams upstream as it arrives, its size
//! checked against `max_request_body` frame by frame.

use crate::http1::FramePoll;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::error::ProxyError;
use crate::server::{whole_frame, whole_hint, ClientBody};

/// How long sluice keeps reading (and discarding) a body it refused, so its
/// answer is not lost to a TCP reset: nginx's lingering close.
const LINGER: Duration = Duration::from_secs(5);

/// Request body bytes held in memory across all requests (for replay and
/// for peeking at a model), against `[server] max_held_body`. Shared by
/// every config, so a reload does not reset it.
#[derive(Debug, Default)]
pub struct HeldBytes(std::sync::atomic::AtomicU64);

/// Bytes one request holds, given back when it is dropped.
#[derive(Debug)]
pub struct Held {
    all: Arc<HeldBytes>,
    n: u64,
}

impl HeldBytes {
    /// Takes `n` more bytes for `held`, unless that would pass `max`.
    pub fn take(self: &Arc<Self>, held: &mut Option<Held>, n: u64, max: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if n == 0 {
            return true;
        }
        let ok = self
            .0
            .fetch_update(Relaxed, Relaxed, |now| {
                now.checked_add(n).filter(|&t| t <= max)
            })
            .is_ok();
        if ok {
            held.get_or_insert_with(|| Held {
                all: self.clone(),
                n: 0,
            })
            .n += n;
        }
        ok
    }

    pub fn now(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.all
            .0
            .fetch_sub(self.n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Limits for request bodies, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_request_body: u64,
    pub retry_buffer: u64,
    /// Longest silence from the client while its body is being collected.
    pub read_timeout: Duration,
}

/// A request body as sent upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Held whole in memory; `Bytes` clones cheaply for a replay.
    Full(Option<Bytes>),
    /// Larger than `retry_buffer`: what was read already, then the rest.
    Streaming(Streaming),
    /// Held whole in pieces: a body with its `model` spliced in.
    Parts(VecDeque<Bytes>),
}

#[derive(Debug)]
pub struct Streaming {
    head: VecDeque<Bytes>,
    rest: ClientBody,
    seen: u64,
    max: u64,
    state: Arc<StreamState>,
    /// Model routing read the start of this body: the rest is scanned as it
    /// streams, and a field it acts on repeated later breaks the upload off
    /// (the upstream never sees a complete body with two values).
    scanner: Option<Box<crate::scan::Scanner>>,
}

/// What the proxy watches of a streaming body while an attempt runs.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Why the stream broke: an HTTP/2 upstream turns a body error into a
    /// stream reset, which hides its cause.
    pub failure: OnceLock<ProxyError>,
    /// Signalled once the whole body has gone upstream.
    pub uploaded: tokio::sync::Notify,
}

/// The error a streaming body gives hyper; the cause is in the failure slot.
#[derive(Debug)]
pub struct RequestBodyError(ProxyError);

impl std::fmt::Display for RequestBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body: {}", self.0)
    }
}

impl std::error::Error for RequestBodyError {}

impl RequestBody {
    /// Reads the client's body: whole if it fits `retry_buffer`, otherwise
    /// the part read so far plus the rest as a stream. A declared length over
    /// the limit is refused before a byte is read.
    pub async fn read(
        mut body: ClientBody,
        limits: BodyLimits,
        expects_continue: bool,
    ) -> Result<Self, ProxyError> {
        match body {
            ClientBody::Failed(e) => return Err(e.into()),
            // In memory already: nothing is gained by streaming it.
            ClientBody::Full(data) => {
                return match data {
                    Some(d) if d.len() as u64 > limits.max_request_body => {
                        Err(ProxyError::RequestTooLarge)
                    }
                    data => Ok(Self::Full(data)),
                }
            }
            ClientBody::Hyper(_) => {}
        }
        let declared = body.size_hint().exact();
        if declared.is_some_and(|n| n > limits.max_request_body) {
            // A client waiting for 100-continue sends nothing more: no need to linger.
            if !expects_continue {
                linger(body);
            }
            return Err(ProxyError::RequestTooLarge);
        }
        if declared == Some(0) {
            return Ok(Self::Full(None));
        }
        let mut head = VecDeque::new();
        let mut seen = 0u64;
        if declared.is_none_or(|n| n <= limits.retry_buffer) {
            loop {
                let frame = match tokio::time::timeout(limits.read_timeout, body.frame()).await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(_) => return Err(ProxyError::RequestTimeout),
                };
                // A client that breaks its body off cannot get a useful answer.
                let frame = frame.map_err(|_| ProxyError::BadRequest)?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                seen += data.len() as u64;
                if seen > limits.max_request_body {
                    linger(body);
                    return Err(ProxyError::RequestTooLarge);
                }
                head.push_back(data);
                if seen > limits.retry_buffer {
                    break;
                }
            }
            if body.is_end_stream() || seen <= limits.retry_buffer {
                return Ok(Self::Full(concat(head, seen)));
            }
        }
        Ok(Self::Streaming(Streaming {
            head,
            rest: body,
            seen,
            max: limits.max_request_body,
            state: Arc::default(),
            scanner: None,
        }))
    }

    /// Scans the rest of a streaming body with `scanner` (which has read
    /// what is held) as it goes upstream.
    pub fn scan_rest(&mut self, scanner: crate::scan::Scanner) {
        if let Self::Streaming(s) = self {
            s.scanner = Some(Box::new(scanner));
        }
    }

    /// A streaming body's state; `None` for a whole body.
    pub fn stream_state(&self) -> Option<Arc<StreamState>> {
        match self {
            Self::Full(_) | Self::Parts(_) => None,
            Self::Streaming(s) => Some(s.state.clone()),
        }
    }

    /// The body's bytes held in memory, from its start: all of a whole
    /// body, the part read so far of a streaming one.
    pub fn held(&self) -> Vec<Bytes> {
        match self {
            Self::Full(b) => b.iter().cloned().collect(),
            Self::Parts(p) => p.iter().cloned().collect(),
            Self::Streaming(s) => s.head.iter().cloned().collect(),
        }
    }

    /// Reads the next frame of a streaming body into what is held, within
    /// `read_timeout`. `None` when nothing more can be held (a whole body,
    /// or the end).
    pub async fn hold_more(&mut self, read_timeout: Duration) -> Result<Option<Bytes>, ProxyError> {
        let Self::Streaming(s) = self else {
            return Ok(None);
        };
        loop {
            let frame = match tokio::time::timeout(read_timeout, s.rest.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(_) => return Err(ProxyError::RequestTimeout),
            };
            let frame = frame.map_err(|_| ProxyError::BadRequest)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            s.seen += data.len() as u64;
            if s.seen > s.max {
                return Err(ProxyError::RequestTooLarge);
            }
            s.head.push_back(data.clone());
            return Ok(Some(data));
        }
    }

    /// Replaces `range` of the held bytes (absolute offsets from the body's
    /// start) with `with`, by slicing: the rest is never copied.
    pub fn splice(&mut self, range: std::ops::Range<u64>, with: Bytes) {
        let held = self.held();
        let parts: VecDeque<Bytes> = crate::scan::splice(&held, range, with).into();
        match self {
            Self::Streaming(s) => s.head = parts,
            whole => *whole = Self::Parts(parts),
        }
    }
}

fn linger(mut body: ClientBody) {
    tokio::spawn(async move {
        let drain = async { while let Some(Ok(_)) = body.frame().await {} };
        let _ = tokio::time::timeout(LINGER, drain).await;
    });
}

/// The size of `head` followed by a body with hint `rest`.
pub fn prefixed_size_hint(head: &VecDeque<Bytes>, rest: SizeHint) -> SizeHint {
    let head: u64 = head.iter().map(|d| d.len() as u64).sum();
    match rest.exact() {
        Some(n) => SizeHint::with_exact(head + n),
        None => {
            let mut h = SizeHint::new();
            h.set_lower(head + rest.lower());
            h
        }
    }
}

fn concat(mut chunks: VecDeque<Bytes>, len: u64) -> Option<Bytes> {
    match chunks.len() {
        0 => None,
        1 => chunks.pop_front(),
        _ => {
            let mut buf = BytesMut::with_capacity(len as usize);
            chunks.iter().for_each(|c| buf.extend_from_slice(c));
            Some(buf.freeze())
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll<Self::Error> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(whole_frame(data)),
            Self::Parts(p) => Poll::Ready(p.pop_front().map(|d| Ok(Frame::data(d)))),
            Self::Streaming(s) => {
                if let Some(d) = s.head.pop_front() {
                    // An h2 client stops polling once is_end_stream() is
                    // true, so the rest's end may never be polled for.
                    if s.head.is_empty() && s.rest.is_end_stream() {
                        s.state.uploaded.notify_one();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                let frame = ready!(Pin::new(&mut s.rest).poll_frame(cx));
                // hyper may stop polling once is_end_stream() is true: signal both ways.
                if frame.is_none() || s.rest.is_end_stream() {
                    s.state.uploaded.notify_one();
                }
                let state = &s.state;
                let fail = |why: ProxyError| {
                    let _ = state.failure.set(why);
                    RequestBodyError(why)
                };
                Poll::Ready(frame.map(|f| {
                    let f = f.map_err(|_| fail(ProxyError::BadRequest))?;
                    if let Some(d) = f.data_ref() {
                        s.seen += d.len() as u64;
                        if s.seen > s.max {
                            return Err(fail(ProxyError::RequestTooLarge));
                        }
                        if let Some(scan) = &mut s.scanner {
                            if let Err(crate::scan::ScanError::Duplicate(_)) = scan.feed(d) {
                                return Err(fail(ProxyError::AmbiguousRequestBody));
                            }
                        }
                    }
                    Ok(f)
                }))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(d) => d.is_none(),
            Self::Parts(p) => p.is_empty(),
            Self::Streaming(s) => s.head.is_empty() && s.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(d) => whole_hint(d),
            Self::Parts(p) => SizeHint::with_exact(p.iter().map(|d| d.len() as u64).sum()),
            Self::Streaming(s) => prefixed_size_hint(&s.head, s.rest.size_hint()),
        }
    }
}
