//! A real hyper upstream on 127.0.0.1:0 that records every request head it
//! sees and answers with a handler the test gives it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type MockBody = BoxBody<Bytes, BoxError>;
type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<MockBody>> + Send>>
        + Send
        + Sync,
>;

/// A request head as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// A running mock upstream; it stops when dropped.
pub struct Mock {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Mock {
    /// Plain HTTP/1.1 and h2c.
    pub async fn start<F, Fut>(handler: F) -> Mock
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        Self::start_inner(handler, None).await
    }

    /// HTTPS with this server config (ALPN included).
    pub async fn start_tls<F, Fut>(handler: F, tls: Arc<rustls::ServerConfig>) -> Mock
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        Self::start_inner(handler, Some(tls)).await
    }

    async fn start_inner<F, Fut>(handler: F, tls: Option<Arc<rustls::ServerConfig>>) -> Mock
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                let (handler, seen, tls) = (handler.clone(), seen2.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push(Seen {
                            method: req.method().clone(),
                            uri: req.uri().clone(),
                            version: req.version(),
                            headers: req.headers().clone(),
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Mock {
            addr,
            seen,
            _stop: stop,
        }
    }

    /// Every request head received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `n` requests in all have arrived; a panic if they have
    /// not within `bound`.
    pub async fn wait_for_requests(&self, n: usize, bound: Duration) {
        let arrived = async {
            while self.seen.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(bound, arrived)
            .await
            .unwrap_or_else(|_| panic!("the upstream did not get {n} requests within {bound:?}"));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A whole body.
pub fn full(data: impl Into<Bytes>) -> MockBody {
    Full::new(data.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// A 200 response with a JSON body.
pub fn json(status: u16, body: &str) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap()
}

/// The one body the tests build by hand (a response from a mock, or a
/// request streamed to sluice), fed through a [`BodyTx`]: each `send` is one
/// frame, `fail` breaks the body off (to its reader, a reset connection),
/// holding the sender without sending keeps the body silent, and dropping it
/// ends the body. The channel holds one frame, so a producer task makes
/// frames only as they are read: flat memory for any length.
pub fn channel() -> (BodyTx, MockBody) {
    let (tx, rx) = mpsc::channel(1);
    (BodyTx(tx), ChannelBody { rx }.boxed())
}

/// The sending end of a [`channel`] body.
pub struct BodyTx(mpsc::Sender<Result<Bytes, BoxError>>);

/// The body was dropped: nobody reads it any more.
#[derive(Debug)]
pub struct BodyDropped;

impl BodyTx {
    /// Sends one data frame, once the one before was read.
    pub async fn send(&self, data: impl Into<Bytes>) -> Result<(), BodyDropped> {
        self.0.send(Ok(data.into())).await.map_err(|_| BodyDropped)
    }

    /// Breaks the body off after the frames sent so far: its reader gets
    /// `error`.
    pub async fn fail(self, error: &str) -> Result<(), BodyDropped> {
        self.0
            .send(Err(error.into()))
            .await
            .map_err(|_| BodyDropped)
    }

    /// Resolves once the body was dropped (the connection let go of it).
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// `len` bytes of `x` in 64 KiB frames, made as they are read (no length
/// declared: set a content-length header to frame it).
pub fn repeat(len: u64) -> MockBody {
    let (tx, body) = channel();
    tokio::spawn(async move {
        let frame = Bytes::from(vec![b'x'; 64 << 10]);
        let mut remaining = len;
        while remaining > 0 {
            let n = remaining.min(frame.len() as u64);
            if tx.send(frame.slice(..n as usize)).await.is_err() {
                return;
            }
            remaining -= n;
        }
    });
    body
}

/// A body read to its end: `Ok` with every byte on a clean end, `Err` with
/// the bytes that came before it broke off and the error.
pub async fn read_body(body: Incoming) -> Result<Bytes, (Bytes, String)> {
    read_body_with(body, |_| {}).await
}

/// [`read_body`], calling `progress` with the length read so far after
/// each data frame.
pub async fn read_body_with(
    mut body: Incoming,
    mut progress: impl FnMut(usize),
) -> Result<Bytes, (Bytes, String)> {
    let mut got = BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    got.extend_from_slice(data);
                    progress(got.len());
                }
            }
            Err(e) => return Err((got.freeze(), e.to_string())),
        }
    }
    Ok(got.freeze())
}
