//! The agent's listeners: kernel vsock in a guest, the channels of a virtio-serial
//! port where the guest has no vsock (`serial.rs`), Unix sockets for tests.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::{Mutex, mpsc};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};

/// A connected stream, whatever the transport.
pub(crate) trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// A listening socket.
pub(crate) enum Listener {
    Vsock(VsockListener, u32),
    Unix(UnixListener, String),
    /// The channels opened to one port of the serial link.
    Channels(
        Mutex<mpsc::UnboundedReceiver<vmkit_serial::Channel>>,
        String,
    ),
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Vsock(_, port) => write!(f, "vsock port {port}"),
            Listener::Unix(_, path) => write!(f, "unix://{path}"),
            Listener::Channels(_, what) => f.write_str(what),
        }
    }
}

impl Listener {
    /// Listens on vsock `port`, any CID.
    pub(crate) fn vsock(port: u32) -> std::io::Result<Listener> {
        Ok(Listener::Vsock(
            VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?,
            port,
        ))
    }

    /// Listens on the Unix socket `path` (replacing a stale one).
    pub(crate) fn unix(path: &Path) -> std::io::Result<Listener> {
        let _ = std::fs::remove_file(path);
        Ok(Listener::Unix(
            UnixListener::bind(path)?,
            path.display().to_string(),
        ))
    }

    /// The next connection. An accept error (e.g. EMFILE) is reported and retried
    /// after a pause rather than in a spin, so the agent keeps serving.
    pub(crate) async fn accept_or_pause(&self) -> Box<dyn Conn> {
        loop {
            let accepted: std::io::Result<Box<dyn Conn>> = match self {
                Listener::Vsock(l, _) => l.accept().await.map(|(c, _)| Box::new(c) as _),
                Listener::Unix(l, _) => l.accept().await.map(|(c, _)| Box::new(c) as _),
                Listener::Channels(rx, _) => match rx.lock().await.recv().await {
                    Some(channel) => Ok(Box::new(channel) as _),
                    None => Err(std::io::Error::other("the serial link's router ended")),
                },
            };
            match accepted {
                Ok(conn) => return conn,
                Err(e) => {
                    crate::log_line(&format!("vmkit-agent: accept on {self}: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
