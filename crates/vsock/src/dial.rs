//! Dialling the guest: one attempt ([`dial`]) or retried until a deadline
//! ([`dial_with_retry`]), over kernel vsock or hybrid vsock.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};
use tokio_vsock::{VsockAddr, VsockStream};

use crate::error::{Error, Result};
use crate::gate::LinkGate;
use vmkit_core::GuestAddr;

/// The longest `OK <n>` line a hybrid vsock peer may send.
const MAX_HANDSHAKE_LINE: usize = 64;
/// The first pause between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
/// The longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// The cause of an attempt the deadline cut short.
const OUT_OF_TIME: &str = "the attempt ran out of time";

/// A connected byte stream to a guest port.
#[derive(Debug)]
pub enum GuestConn {
    /// Over hybrid vsock, after the `OK`.
    Hybrid(HybridConn),
    /// Over kernel vsock.
    Vsock(VsockStream),
}

/// A hybrid-vsock connection, held back by its socket's [`LinkGate`] (if one is
/// registered) while that is closed: reads and writes wait, and a drop closes the
/// socket only once the gate opens.
#[derive(Debug)]
pub struct HybridConn {
    /// `None` only once dropped.
    stream: Option<UnixStream>,
    gate: Option<LinkGate>,
}

impl HybridConn {
    fn new(stream: UnixStream, gate: Option<LinkGate>) -> HybridConn {
        HybridConn {
            stream: Some(stream),
            gate,
        }
    }

    /// The stream once the gate lets traffic through.
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut UnixStream>> {
        if let Some(gate) = &self.gate
            && gate.poll_open(cx).is_pending()
        {
            return Poll::Pending;
        }
        match self.stream.as_mut() {
            Some(stream) => Poll::Ready(Ok(stream)),
            None => Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected))),
        }
    }
}

impl Drop for HybridConn {
    fn drop(&mut self) {
        if let (Some(gate), Some(stream)) = (&self.gate, self.stream.take()) {
            gate.defer_close(stream);
        }
    }
}

impl AsyncRead for HybridConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().poll_stream(cx) {
            Poll::Ready(Ok(s)) => Pin::new(s).poll_read(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for HybridConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().poll_stream(cx) {
            Poll::Ready(Ok(s)) => Pin::new(s).poll_write(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_stream(cx) {
            Poll::Ready(Ok(s)) => Pin::new(s).poll_flush(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_stream(cx) {
            Poll::Ready(Ok(s)) => Pin::new(s).poll_shutdown(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for GuestConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GuestConn::Hybrid(s) => Pin::new(s).poll_read(cx, buf),
            GuestConn::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GuestConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GuestConn::Hybrid(s) => Pin::new(s).poll_write(cx, buf),
            GuestConn::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GuestConn::Hybrid(s) => Pin::new(s).poll_flush(cx),
            GuestConn::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GuestConn::Hybrid(s) => Pin::new(s).poll_shutdown(cx),
            GuestConn::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One connection attempt, bounded by `timeout`.
///
/// # Errors
/// [`Error::Dial`], whose [`Error::is_transient`] says whether trying again may help;
/// a timeout is transient.
pub async fn dial(addr: &GuestAddr, timeout: Duration) -> Result<GuestConn> {
    attempt(addr, Instant::now() + timeout).await
}

/// Dials until it connects or `timeout` passes, with a fresh socket per attempt and a
/// backoff from 1 ms. Transient failures (refused, reset, no socket yet, closed before
/// `OK`) are retried; permanent ones (permission, a bad address, a peer that answers
/// something other than `OK`) fail at once.
///
/// # Errors
/// The permanent [`Error::Dial`], or [`Error::DialTimeout`] with the attempt count and
/// the last cause.
pub async fn dial_with_retry(addr: &GuestAddr, timeout: Duration) -> Result<GuestConn> {
    let deadline = Instant::now() + timeout;
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    let mut last = String::new();
    loop {
        attempts += 1;
        let cause = match attempt(addr, deadline).await {
            Ok(conn) => {
                tracing::debug!(%addr, attempts, "guest dialled");
                return Ok(conn);
            }
            Err(Error::Dial {
                cause,
                transient: true,
                ..
            }) => cause,
            Err(e) => return Err(e),
        };
        // An attempt cut short by the deadline says less than the failure before it.
        if cause != OUT_OF_TIME || last.is_empty() {
            last = cause;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::DialTimeout {
                addr: addr.to_string(),
                attempts,
                after: timeout,
                last: std::mem::take(&mut last),
            });
        }
        tracing::trace!(%addr, attempts, %last, "dial failed; retrying");
        tokio::time::sleep_until((now + backoff).min(deadline)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn failure(addr: &GuestAddr, cause: impl Into<String>, transient: bool) -> Error {
    Error::Dial {
        addr: addr.to_string(),
        cause: cause.into(),
        transient,
    }
}

/// Whether an I/O error from connect or the handshake may go away by itself.
fn transient_io(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        NotFound
            | ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | BrokenPipe
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
            | UnexpectedEof
            | Interrupted
    )
}

async fn attempt(addr: &GuestAddr, deadline: Instant) -> Result<GuestConn> {
    let work = async {
        match addr {
            GuestAddr::Vsock { cid, port } => VsockStream::connect(VsockAddr::new(*cid, *port))
                .await
                .map(GuestConn::Vsock)
                .map_err(|e| failure(addr, format!("connect: {e}"), transient_io(&e))),
            GuestAddr::HybridVsock { uds, port } => {
                // A paused VM's link takes no traffic, a connect included: wait for
                // its resume (the deadline bounds the wait).
                let gate = LinkGate::lookup(uds);
                if let Some(gate) = &gate {
                    gate.wait_open().await;
                }
                let mut stream = UnixStream::connect(uds).await.map_err(|e| {
                    failure(
                        addr,
                        format!("connect {}: {e}", uds.display()),
                        transient_io(&e),
                    )
                })?;
                let handshake = hybrid_handshake(addr, &mut stream, *port).await;
                let conn = HybridConn::new(stream, gate);
                handshake.map(|()| GuestConn::Hybrid(conn))
            }
            GuestAddr::Unix { dir, port } => {
                let socket = match vmkit_proto::unix_socket_name(*port) {
                    Some(name) => dir.join(name),
                    None => {
                        let other = *port;
                        return Err(failure(
                            addr,
                            format!(
                                "port {other}: the agent's host test mode serves only {} and {}",
                                vmkit_proto::AGENT_PORT,
                                vmkit_proto::STREAM_PORT
                            ),
                            false,
                        ));
                    }
                };
                // A plain Unix socket: no handshake, no gate (no VM to pause).
                UnixStream::connect(&socket)
                    .await
                    .map(|stream| GuestConn::Hybrid(HybridConn::new(stream, None)))
                    .map_err(|e| {
                        failure(
                            addr,
                            format!("connect {}: {e}", socket.display()),
                            transient_io(&e),
                        )
                    })
            }
        }
    };
    match timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(failure(addr, OUT_OF_TIME, true)),
    }
}

/// `CONNECT <port>\n`, then `OK <n>\n` (see [`handshake`]), its failure as a dial error.
async fn hybrid_handshake(addr: &GuestAddr, stream: &mut UnixStream, port: u32) -> Result<()> {
    handshake(stream, port)
        .await
        .map_err(|failed| match failed {
            Handshake::Write(e) => {
                failure(addr, format!("write CONNECT {port}: {e}"), transient_io(&e))
            }
            Handshake::Closed => failure(
                addr,
                format!("closed before OK: nothing listens on guest port {port} yet"),
                true,
            ),
            Handshake::Read(e) => failure(
                addr,
                format!("read the CONNECT answer: {e}"),
                transient_io(&e),
            ),
            Handshake::Garbage(line) => garbage(addr, &line),
        })
}

/// How a hybrid-vsock handshake failed.
enum Handshake {
    /// Writing the `CONNECT` line failed.
    Write(io::Error),
    /// The daemon closed after reading it: it asked the guest, and nothing listens.
    Closed,
    /// Reading the answer failed.
    Read(io::Error),
    /// The answer was not `OK <n>`.
    Garbage(Vec<u8>),
}

/// `CONNECT <port>\n`, then `OK <n>\n`, read a byte at a time so that nothing the guest
/// sends after the `OK` is swallowed.
async fn handshake(stream: &mut UnixStream, port: u32) -> std::result::Result<(), Handshake> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(Handshake::Write)?;
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Handshake::Closed),
            Err(e) => return Err(Handshake::Read(e)),
        };
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(Handshake::Garbage(line));
        }
    }
    match String::from_utf8_lossy(&line).strip_prefix("OK ") {
        Some(n) if n.parse::<u32>().is_ok() => Ok(()),
        _ => Err(Handshake::Garbage(line)),
    }
}

/// What one hybrid-vsock dial found out about the daemon behind a socket
/// ([`probe_hybrid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HybridProbe {
    /// A guest program accepted the connection (`OK <n>`).
    Answered,
    /// The daemon read the `CONNECT` line, asked the guest and closed: nothing listens
    /// on the port yet.
    NotListening,
    /// The daemon closed the connection without reading the `CONNECT` line (a broken
    /// pipe, or a reset: a socket closed with unread data resets). vhost-device-vsock
    /// does that to every dial while it has no guest memory table: before the guest's
    /// driver started the device, or when the daemon lost it.
    Unread,
    /// Anything else: no socket, no answer in time, an answer that is not `OK <n>`.
    Other,
}

/// One dial of guest `port` through the hybrid-vsock daemon at `uds`, bounded by
/// `timeout`, to learn what the daemon does with it (see [`HybridProbe`]). The
/// connection is closed at once, and a paused VM's [`LinkGate`] is not waited for: the
/// caller knows its VM runs.
pub async fn probe_hybrid(uds: &Path, port: u32, timeout: Duration) -> HybridProbe {
    let probe = async {
        let Ok(mut stream) = UnixStream::connect(uds).await else {
            return HybridProbe::Other;
        };
        let unread = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            )
        };
        match handshake(&mut stream, port).await {
            Ok(()) => HybridProbe::Answered,
            Err(Handshake::Closed) => HybridProbe::NotListening,
            Err(Handshake::Write(e) | Handshake::Read(e)) if unread(&e) => HybridProbe::Unread,
            Err(_) => HybridProbe::Other,
        }
    };
    tokio::time::timeout(timeout, probe)
        .await
        .unwrap_or(HybridProbe::Other)
}

fn garbage(addr: &GuestAddr, line: &[u8]) -> Error {
    let shown: String = String::from_utf8_lossy(line)
        .chars()
        .take(MAX_HANDSHAKE_LINE)
        .collect();
    failure(
        addr,
        format!("the hybrid vsock peer answered {shown:?} instead of \"OK <port>\""),
        false,
    )
}
