//! A request body as the server hands it on.

use crate::http1::FramePoll;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A request body as it came from the client.
#[derive(Debug)]
pub enum ClientBody {
    /// Read by hyper (HTTP/2, and HTTP/1.1 requests the fast path hands over).
    Hyper(Incoming),
    /// Read whole by sluice's own HTTP/1.1 server before the request was
    /// dispatched.
    Full(Option<Bytes>),
    /// The client stopped short while sluice's own server read the body;
    /// the handler answers for it.
    Failed(BodyError),
}

/// Why the server could not read a body whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The client went silent for longer than the read timeout.
    TimedOut,
    /// The client closed before the end of the body.
    Incomplete,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::TimedOut => "the client went silent mid-body",
            Self::Incomplete => "the client's body broke off",
        })
    }
}

impl std::error::Error for BodyError {}

/// The one frame of a body held whole (`None` once taken), then the end.
pub fn whole_frame<E>(data: &mut Option<Bytes>) -> Option<Result<Frame<Bytes>, E>> {
    data.take().map(|d| Ok(Frame::data(d)))
}

/// The exact size of a body held whole.
pub fn whole_hint(data: &Option<Bytes>) -> SizeHint {
    SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll<Self::Error> {
        match self.get_mut() {
            Self::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|_| BodyError::Incomplete))),
            Self::Full(data) => Poll::Ready(whole_frame(data)),
            Self::Failed(e) => Poll::Ready(Some(Err(*e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::Full(d) => d.is_none(),
            Self::Failed(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            Self::Full(d) => whole_hint(d),
            Self::Failed(_) => SizeHint::default(),
        }
    }
}
