//! The fake's network side: the listener and every accepted connection,
//! wrapped so that outages can refuse, stall ("blackhole") or reset them,
//! and so that raw TCP bytes are counted.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::FakeUpstream;
use super::state::{Shared, lock};

/// Whether the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// Listening and serving.
    Up,
    /// Listener closed (connections refused); open connections were reset.
    Refusing,
    /// Listening and accepting, but no byte is read or written on any
    /// connection (like a network partition): calls hang until the client
    /// gives up or [`FakeUpstream::come_up`].
    Blackhole,
}

const LINK_UP: u8 = 0;
const LINK_STALLED: u8 = 1;
const LINK_KILLED: u8 = 2;

/// Per-connection switch, flipped by the fake and checked on every I/O.
struct LinkCtl {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl LinkCtl {
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.waker.wake();
    }

    /// `None`: go ahead with the I/O. Registers the task first, so a state
    /// change always wakes it.
    fn gate<T>(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<T>>> {
        self.waker.register(cx.waker());
        match self.state.load(Ordering::Acquire) {
            LINK_UP => None,
            LINK_STALLED => Some(Poll::Pending),
            _ => Some(Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fake upstream dropped the connection",
            )))),
        }
    }
}

/// Raw TCP traffic and connections, for the byte-level assertions.
#[derive(Default)]
pub(super) struct NetCounters {
    pub(super) tcp_in: AtomicU64,
    pub(super) tcp_out: AtomicU64,
    pub(super) connections: AtomicU64,
}

/// An accepted connection that the fake can stall or kill.
pub(super) struct Conn {
    io: TcpStream,
    ctl: Arc<LinkCtl>,
    counters: Arc<NetCounters>,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(p) = self.ctl.gate(cx) {
            return p;
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters.tcp_in.fetch_add(n, Ordering::Relaxed);
        res
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(p) = self.ctl.gate(cx) {
            return p;
        }
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.counters
                .tcp_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(p) = self.ctl.gate(cx) {
            return p;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The listener's state and a switch per open connection.
pub(super) struct Net {
    mode: NetMode,
    links: Vec<Weak<LinkCtl>>,
    accept: Option<JoinHandle<()>>,
}

impl Default for Net {
    fn default() -> Self {
        Net {
            mode: NetMode::Up,
            links: Vec::new(),
            accept: None,
        }
    }
}

impl Net {
    fn set_all(&mut self, from: &[u8], to: u8) {
        self.links.retain(|w| w.strong_count() > 0);
        for link in self.links.iter().filter_map(Weak::upgrade) {
            if from.contains(&link.state.load(Ordering::Acquire)) {
                link.set(to);
            }
        }
    }
}
/// Starts accepting on `listener` (at start-up).
pub(super) fn listen(s: &Arc<Shared>, listener: TcpListener) {
    let task = tokio::spawn(accept_loop(listener, s.clone()));
    lock(&s.net).accept = Some(task);
}

/// Closes the listener and resets every connection (when the fake is dropped).
pub(super) fn shut(s: &Shared) {
    let mut net = lock(&s.net);
    net.set_all(&[LINK_UP, LINK_STALLED], LINK_KILLED);
    if let Some(task) = net.accept.take() {
        task.abort();
    }
}

/// Outages.
impl FakeUpstream {
    /// Whether the fake answers now.
    pub fn net_mode(&self) -> NetMode {
        lock(&self.s.net).mode
    }

    /// Stops listening (new connections are refused) and resets every open
    /// connection, so in-flight calls fail with UNAVAILABLE-like errors.
    pub async fn go_down(&self) {
        let accept = {
            let mut net = lock(&self.s.net);
            net.mode = NetMode::Refusing;
            net.set_all(&[LINK_UP, LINK_STALLED], LINK_KILLED);
            net.accept.take()
        };
        if let Some(task) = accept {
            task.abort();
            let _ = task.await; // the listener is closed once this returns
        }
    }

    /// Keeps accepting connections but stops moving bytes on all of them
    /// (existing and new) until [`Self::come_up`]: calls hang.
    pub async fn blackhole(&self) {
        {
            let mut net = lock(&self.s.net);
            net.mode = NetMode::Blackhole;
            net.set_all(&[LINK_UP], LINK_STALLED);
        }
        self.ensure_listening().await;
    }

    /// Serves again on the same port; stalled connections resume.
    pub async fn come_up(&self) {
        self.ensure_listening().await;
        let mut net = lock(&self.s.net);
        net.mode = NetMode::Up;
        net.set_all(&[LINK_STALLED], LINK_UP);
    }

    /// Resets every open connection; keeps listening.
    pub fn drop_connections(&self) {
        lock(&self.s.net).set_all(&[LINK_UP, LINK_STALLED], LINK_KILLED);
    }

    async fn ensure_listening(&self) {
        if lock(&self.s.net).accept.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.s.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("fake upstream cannot listen on {} again: {e}", self.s.addr),
            }
        };
        let task = tokio::spawn(accept_loop(listener, self.s.clone()));
        let mut net = lock(&self.s.net);
        if let Some(old) = net.accept.replace(task) {
            old.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, s: Arc<Shared>) {
    loop {
        let io = match listener.accept().await {
            Ok((io, _)) => io,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = io.set_nodelay(true);
        let ctl = {
            let mut net = lock(&s.net);
            let state = match net.mode {
                NetMode::Blackhole => LINK_STALLED,
                _ => LINK_UP,
            };
            let ctl = Arc::new(LinkCtl {
                state: AtomicU8::new(state),
                waker: AtomicWaker::new(),
            });
            net.links.retain(|w| w.strong_count() > 0);
            net.links.push(Arc::downgrade(&ctl));
            ctl
        };
        s.counters.connections.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            io,
            ctl,
            counters: s.counters.clone(),
        };
        if s.conn_tx.send(Ok(conn)).await.is_err() {
            return;
        }
    }
}
