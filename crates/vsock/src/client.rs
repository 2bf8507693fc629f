//! TTRPC over a guest connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use vmkit_proto::AgentClient;
use vmkit_proto::agent::PingRequest;

use crate::dial::{GuestConn, dial, dial_with_retry};
use crate::error::{Error, Result};
use vmkit_core::GuestAddr;

/// The TTRPC client type (`ttrpc::r#async::Client`); wrap it in
/// `vmkit_proto::AgentClient` for typed calls.
pub type TtrpcClient = ttrpc::r#async::Client;

/// A TTRPC client over an open connection.
pub fn ttrpc_client(conn: GuestConn) -> TtrpcClient {
    ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(conn))
}

/// Dials `addr` once and speaks TTRPC over it.
///
/// # Errors
/// As [`crate::dial`].
pub async fn connect_ttrpc(addr: &GuestAddr, timeout: Duration) -> Result<TtrpcClient> {
    Ok(ttrpc_client(dial(addr, timeout).await?))
}

/// Dials `addr` with retry until `timeout` and speaks TTRPC over it.
///
/// # Errors
/// As [`crate::dial_with_retry`].
pub async fn connect_ttrpc_with_retry(addr: &GuestAddr, timeout: Duration) -> Result<TtrpcClient> {
    Ok(ttrpc_client(dial_with_retry(addr, timeout).await?))
}

/// A client of the agent at `addr` that answered a `Ping`, and its health: dials with
/// retry and pings, until `deadline`. A connection taken and then dropped before the
/// `Ping` is answered — an agent starting or restarting, however long it takes, or a
/// relay (the serial bridge) that accepts before the agent does — is dialled again, so
/// what comes back reaches a live agent.
///
/// # Errors
/// The last dial failure ([`Error::DialTimeout`]) when no connection was made by the
/// deadline; [`Error::Agent`] when the last connection's `Ping` failed at the deadline.
pub async fn connect_agent(
    addr: &GuestAddr,
    deadline: Instant,
) -> Result<(TtrpcClient, ConnHealth)> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let conn = dial_with_retry(addr, remaining).await?;
        let (client, health) = ttrpc_client_tracked(conn);
        match ping(&client, deadline).await {
            Ok(()) => return Ok((client, health)),
            Err(cause) if Instant::now() < deadline => {
                tracing::debug!(%addr, %cause, "agent connection dropped before Ping; redialling");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(cause) => {
                return Err(Error::Agent {
                    addr: addr.to_string(),
                    call: "Ping",
                    cause,
                });
            }
        }
    }
}

/// One `Ping`, bounded by `deadline`.
async fn ping(client: &TtrpcClient, deadline: Instant) -> std::result::Result<(), String> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let nanos = i64::try_from(remaining.as_nanos()).unwrap_or(i64::MAX);
    let agent = AgentClient::new(client.clone());
    match tokio::time::timeout_at(
        deadline,
        agent.ping(ttrpc::context::with_timeout(nanos), &PingRequest::new()),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {remaining:?}")),
    }
}

/// Whether a connection given to TTRPC is still open: it turns false once its reader
/// saw EOF or an error, or its writer an error. TTRPC's reader task reads without
/// pause, so a peer that closes is noticed at once.
#[derive(Debug, Clone)]
pub struct ConnHealth(Arc<AtomicBool>);

impl ConnHealth {
    /// `false` once the connection is known to be dead.
    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn dead(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A TTRPC client over `conn`, and a handle that tells when the connection died (so a
/// cached client can be re-dialled before a call fails on it).
pub fn ttrpc_client_tracked(conn: GuestConn) -> (TtrpcClient, ConnHealth) {
    let health = ConnHealth(Arc::new(AtomicBool::new(true)));
    let tracked = Tracked {
        inner: conn,
        health: health.clone(),
    };
    let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(tracked));
    (client, health)
}

struct Tracked {
    inner: GuestConn,
    health: ConnHealth,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.health.dead();
            }
            Poll::Ready(Err(_)) => this.health.dead(),
            _ => {}
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Err(_))) {
            this.health.dead();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.health.dead();
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// One VM's cached agent client, for `GuestCommunicator::client`: handed out while its
/// connection lives (and, when asked to verify, while the agent answers a `Ping` on it
/// within [`AgentCache::PROBE`]), re-dialled with [`connect_agent`] otherwise. One
/// re-dial at a time: callers that found the connection dead wait for it.
#[derive(Default)]
pub struct AgentCache {
    cached: tokio::sync::Mutex<Option<(TtrpcClient, ConnHealth)>>,
}

impl std::fmt::Debug for AgentCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCache").finish_non_exhaustive()
    }
}

impl AgentCache {
    /// How long a cached client's `Ping` may take when it is verified.
    pub const PROBE: Duration = Duration::from_millis(500);

    /// A cache with no client yet.
    pub fn new() -> AgentCache {
        AgentCache::default()
    }

    /// The cached client of the agent at `addr`, or a new one that answered a `Ping`
    /// within `dial`. With `verify`, the cached client must also answer a `Ping` now
    /// (for a link whose closing is not seen on the connection itself — a serial relay
    /// whose guest side restarted).
    ///
    /// # Errors
    /// As [`connect_agent`].
    pub async fn client(
        &self,
        addr: &GuestAddr,
        dial: Duration,
        verify: bool,
    ) -> Result<TtrpcClient> {
        let mut cached = self.cached.lock().await;
        if let Some((client, health)) = cached.as_ref()
            && health.is_alive()
            && (!verify || ping(client, Instant::now() + Self::PROBE).await.is_ok())
        {
            return Ok(client.clone());
        }
        *cached = None;
        let (client, health) = connect_agent(addr, Instant::now() + dial).await?;
        *cached = Some((client.clone(), health));
        Ok(client)
    }

    /// Drops the cached client (the VM ended), unless a re-dial holds the cache: that
    /// one's client is dropped with the cache.
    pub fn forget(&self) {
        if let Ok(mut cached) = self.cached.try_lock() {
            *cached = None;
        }
    }
}
