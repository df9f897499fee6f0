//! A TCP proxy that can break the link it carries, for fault-injection tests: between agents and
//! the control plane, or between the control plane and PostgreSQL.
//!
//! - [`Mode::Pass`] forwards bytes both ways.
//! - [`Mode::Delay`] forwards each chunk after a delay.
//! - [`Mode::Blackhole`] forwards nothing and answers nothing, but keeps every connection open
//!   (new ones are accepted and left hanging): a partition. Bytes already sent wait in the
//!   sockets and flow again when the mode returns to `Pass`, as after a healed partition.
//! - [`Mode::Reset`] resets every open connection and each new one at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Delay(Duration),
    Blackhole,
    Reset,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (mode, watch) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(carry(client, upstream, watch.clone()));
            }
        });
        Proxy { addr, mode, accepted, task }
    }

    /// Changes how the link behaves, for open connections and new ones.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Waits while the link is black-holed; returns the mode that ended the wait.
async fn while_blackholed(mode: &mut watch::Receiver<Mode>) -> Mode {
    loop {
        let now = *mode.borrow_and_update();
        if now != Mode::Blackhole {
            return now;
        }
        if mode.changed().await.is_err() {
            return Mode::Reset;
        }
    }
}

/// Makes closing `stream` send a reset instead of a clean end.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn carry(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    if while_blackholed(&mut mode).await == Mode::Reset {
        reset(&client);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(&client);
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone());
    let down = pump(sr, cw, mode);
    let _ = tokio::join!(up, down);
}

/// Copies `from` to `to` as the mode allows; on `Reset` both sides are reset.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let current = while_blackholed(&mut mode).await;
        if current == Mode::Reset {
            reset(to.as_ref());
            reset(from.as_ref());
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => { let _ = to.shutdown().await; return } Ok(n) => n },
            changed = mode.changed() => { if changed.is_err() { return } continue }
        };
        let now = *mode.borrow();
        if let Mode::Delay(d) = now {
            tokio::time::sleep(d).await;
        }
        // A chunk read just before a partition is held until it heals (or the link resets).
        if while_blackholed(&mut mode).await == Mode::Reset {
            reset(to.as_ref());
            reset(from.as_ref());
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
