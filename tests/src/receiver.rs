//! A webhook receiver on loopback: real HTTP (plain or TLS), answers from a script, records
//! every request with the time it arrived.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

use crate::tls::TestCa;

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, with these headers.
    Status(u16, Vec<(&'static str, String)>),
    /// Wait this long, then answer 200 (longer than the webhook's timeout: a timeout).
    Hang(Duration),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Status(200, vec![])
    }
    pub fn status(code: u16) -> Reply {
        Reply::Status(code, vec![])
    }
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    /// HTTP/1.1, or HTTP/2 where TLS negotiated it.
    pub version: hyper::Version,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
}

impl Received {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    }
}

#[derive(Default)]
struct Shared {
    /// Requests being answered now, and the most ever at once.
    active: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    /// Connections accepted so far.
    connections: std::sync::atomic::AtomicUsize,
    script: Mutex<VecDeque<Reply>>,
    fallback: Mutex<Option<Reply>>,
    seen: Mutex<Vec<Received>>,
    /// Requests so far (also counted when they are not kept).
    count: std::sync::atomic::AtomicUsize,
    /// Keep only the count, not the requests (for benchmarks).
    count_only: std::sync::atomic::AtomicBool,
    arrived: Notify,
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// An HTTPS receiver whose certificate `ca` signed (for `localhost` and `127.0.0.1`).
    pub async fn https(ca: &TestCa) -> Receiver {
        Self::https_at(ca, "127.0.0.1:0", &["localhost", "127.0.0.1"]).await
    }

    /// An HTTPS receiver listening on `bind`, with a certificate for `names`.
    pub async fn https_at(ca: &TestCa, bind: &str, names: &[&str]) -> Receiver {
        Self::start(bind, Some(tokio_rustls::TlsAcceptor::from(ca.server_config(names)))).await
    }

    /// A plain HTTP receiver.
    pub async fn http() -> Receiver {
        Self::start("127.0.0.1:0", None).await
    }

    async fn start(bind: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let listener = tokio::net::TcpListener::bind(bind).await.expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                s.connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Receiver { addr, tls: is_tls, shared, task }
    }

    /// The URL of `path` on this receiver, by IP address.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Answers the next requests with `replies`, in order, then as before.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// Keeps only the number of requests, not the requests themselves (for benchmarks).
    pub fn count_only(&self) {
        self.shared.count_only.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.shared.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Answers every request not scripted with `reply` (200 by default).
    pub fn always(&self, reply: Reply) {
        *self.shared.fallback.lock().unwrap() = Some(reply);
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests that were being answered at the same time.
    pub fn most_concurrent(&self) -> usize {
        self.shared.most.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived (panics after `limit`) and returns all of them.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.arrived.notified();
            if self.count() >= n {
                return self.requests();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("expected {n} requests at {}, got {} within {limit:?}", self.url(""), self.count());
            }
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    use std::sync::atomic::Ordering::SeqCst;
    let now_active = shared.active.fetch_add(1, SeqCst) + 1;
    shared.most.fetch_max(now_active, SeqCst);
    let answer = answer(&shared, req).await;
    shared.active.fetch_sub(1, SeqCst);
    answer
}

async fn answer(shared: &Shared, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let version = req.version();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let at_ms = chrono::Utc::now().timestamp_millis();
    if !shared.count_only.load(std::sync::atomic::Ordering::SeqCst) {
        shared.seen.lock().unwrap().push(Received { path, headers, body, version, at_ms });
    }
    shared.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    shared.arrived.notify_waiters();
    let reply = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| shared.fallback.lock().unwrap().clone())
        .unwrap_or_else(Reply::ok);
    let (status, extra) = match reply {
        Reply::Status(code, headers) => (code, headers),
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            (200, vec![])
        }
    };
    let mut response = Response::builder().status(status);
    for (k, v) in extra {
        response = response.header(k, v);
    }
    Ok(response.body(Full::new(Bytes::from_static(b"received"))).unwrap())
}
