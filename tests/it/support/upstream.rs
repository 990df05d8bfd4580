//! A raw HTTP/1 upstream: a bare TCP listener whose handler writes exact
//! bytes (hyper's own server cannot send broken HTTP). It counts the
//! connections it accepts and records the requests read on them: reuse is
//! what the upstream sees, not what sluice says.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::raw::{Conn, Message};

/// Requests read, each with the index of the connection it came on.
type Seen = Arc<Mutex<Vec<(usize, Message)>>>;

/// One connection a [`RawUpstream`] accepted, handed to its handler. It
/// derefs to the raw [`Conn`] (`buf`, `stream`, `fill`...).
pub struct Accepted {
    conn: Conn,
    /// Which accepted connection this is (0 for the first).
    pub index: usize,
    seen: Seen,
}

impl Accepted {
    /// The next request with its content-length body ([`Conn::request`]),
    /// recorded; `None` once the peer closed or reset the connection.
    pub async fn request(&mut self) -> Option<Message> {
        let req = self.conn.request().await;
        self.record(req)
    }

    /// The next request head alone, its body left in `buf`; recorded.
    pub async fn request_head(&mut self) -> Option<Message> {
        let req = self.conn.request_head().await;
        self.record(req)
    }

    fn record(&self, req: Option<Message>) -> Option<Message> {
        if let Some(req) = &req {
            self.seen.lock().unwrap().push((self.index, req.clone()));
        }
        req
    }

    /// Writes `bytes` (a peer that went away is not the handler's problem).
    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = self.conn.stream.write_all(bytes).await;
    }

    /// Reads and discards until the peer closes; the bytes discarded.
    pub async fn drain_until_closed(&mut self) -> usize {
        let mut total = 0;
        loop {
            total += self.conn.buf.len();
            self.conn.buf.clear();
            if self.conn.read_more().await == 0 {
                return total;
            }
        }
    }
}

impl Deref for Accepted {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl DerefMut for Accepted {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// A raw upstream on 127.0.0.1:0: every connection it accepts is handed to
/// the handler. Stops (connections included) when dropped.
pub struct RawUpstream {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: Seen,
    task: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(handler: F) -> RawUpstream
    where
        F: Fn(Accepted) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Seen::default();
        let (accepted2, seen2) = (accepted.clone(), seen.clone());
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: aborts every connection's task.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let index = accepted2.fetch_add(1, Ordering::SeqCst);
                conns.spawn(handler(Accepted {
                    conn: Conn::new(stream),
                    index,
                    seen: seen2.clone(),
                }));
            }
        });
        RawUpstream {
            addr,
            accepted,
            seen,
            task,
        }
    }

    /// Answers every request with `respond(connection index, request)` and
    /// keeps each connection open for the next one.
    pub async fn keep_alive<R>(respond: R) -> RawUpstream
    where
        R: Fn(usize, &Message) -> Vec<u8> + Send + Sync + 'static,
    {
        let respond = Arc::new(respond);
        RawUpstream::start(move |mut conn| {
            let respond = respond.clone();
            async move {
                while let Some(req) = conn.request().await {
                    let bytes = respond(conn.index, &req);
                    conn.write(&bytes).await;
                }
            }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every request read so far, in order.
    pub fn seen(&self) -> Vec<Message> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// The connection each request read so far came on, in order.
    pub fn conns(&self) -> Vec<usize> {
        self.seen.lock().unwrap().iter().map(|(c, _)| *c).collect()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
