//! Serving over a virtio-serial port, for guests without vsock: the port carries a
//! [`vmkit_serial::Mux`], and each channel the host opens to the TTRPC port or the
//! stream port is handed to that listener as a connection. When the link ends (the
//! host disconnected, or its stream broke) the port is opened again, and a host that
//! comes back says hello on a fresh link.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Mutex, mpsc};
use vmkit_proto::{AGENT_PORT, STREAM_PORT};
use vmkit_serial::{Channel, Mux, Side};

use crate::listen::Listener;

/// How long the agent waits before opening the port again after its link ended.
const REOPEN: Duration = Duration::from_millis(100);

/// The guest's end of the serial link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialEnd {
    /// A virtio-serial port's character device (`/dev/vport0p1`).
    Device(PathBuf),
    /// A Unix socket standing in for the port (the host test mode): the agent
    /// connects to it as the guest's end.
    Socket(PathBuf),
}

impl std::fmt::Display for SerialEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialEnd::Device(p) => write!(f, "serial port {}", p.display()),
            SerialEnd::Socket(p) => write!(f, "serial socket {}", p.display()),
        }
    }
}

/// The TTRPC and stream listeners of the link at `end`, and the task that routes the
/// host's channels to them (it runs until the agent stops).
pub(crate) fn listeners(
    end: &SerialEnd,
) -> (Listener, Listener, impl Future<Output = ()> + Send + use<>) {
    let (rpc_tx, rpc_rx) = mpsc::unbounded_channel();
    let (stream_tx, stream_rx) = mpsc::unbounded_channel();
    let rpc = Listener::Channels(Mutex::new(rpc_rx), format!("{end}, port {AGENT_PORT}"));
    let streams = Listener::Channels(Mutex::new(stream_rx), format!("{end}, port {STREAM_PORT}"));
    let end = end.clone();
    let router = async move {
        loop {
            match open(&end).await {
                Ok(io) => route(io, &rpc_tx, &stream_tx).await,
                Err(e) => crate::log_line(&format!("vmkit-agent: open {end}: {e}")),
            }
            tokio::time::sleep(REOPEN).await;
        }
    };
    (rpc, streams, router)
}

/// Serves one link over `io` until it ends.
async fn route(
    io: Box<dyn Port>,
    rpc: &mpsc::UnboundedSender<Channel>,
    streams: &mpsc::UnboundedSender<Channel>,
) {
    let (_mux, mut incoming) = Mux::serving(io, Side::Guest, &[AGENT_PORT, STREAM_PORT]);
    while let Some(channel) = incoming.accept().await {
        let to = if channel.port() == AGENT_PORT {
            rpc
        } else {
            streams
        };
        let _ = to.send(channel);
    }
}

/// A byte stream the mux runs over.
trait Port: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Port for T {}

async fn open(end: &SerialEnd) -> std::io::Result<Box<dyn Port>> {
    match end {
        SerialEnd::Socket(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        SerialEnd::Device(path) => Ok(Box::new(open_device(path)?)),
    }
}

/// A virtio-serial port read and written without blocking a runtime thread. A read
/// returns at most one of the port's 4 KiB buffers even when more wait, so a short read
/// does not mean the port is drained: readiness is cleared only when a read would block
/// (tokio's own file and pipe types clear it after any short read, and then wait for a
/// wake-up that never comes).
struct Device(AsyncFd<std::fs::File>);

fn open_device(path: &Path) -> std::io::Result<Device> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    // `AsyncFd::new` is deprecated because an `AsRawFd` type may change or close its fd
    // while registered; a `File` owns its one fd until it is dropped with the AsyncFd,
    // so that cannot happen here.
    #[allow(deprecated)]
    let fd = AsyncFd::new(file)?;
    Ok(Device(fd))
}

impl AsyncRead for Device {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let read = guard.try_io(|fd| {
                let mut file: &std::fs::File = fd.get_ref();
                std::io::Read::read(&mut file, unfilled)
            });
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: readiness was cleared; wait for the next wake-up.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Device {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let written = guard.try_io(|fd| {
                let mut file: &std::fs::File = fd.get_ref();
                std::io::Write::write(&mut file, buf)
            });
            if let Ok(result) = written {
                return Poll::Ready(result);
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
