//! The host end of a virtio-serial guest link. QEMU serves the port on a Unix-socket
//! chardev; the bridge connects to it with a [`vmkit_serial::Mux`] and serves each of the
//! agent's ports as a Unix socket in a private dir, laid out as the agent's host test
//! mode is (`agent.sock`, `stream.sock`). So the VM's guest address is an ordinary
//! [`GuestAddr::Unix`]: every dialer — vmkit-vsock, the plugin adapter — reaches the agent
//! as it would anywhere, and each connection becomes one channel of the link.
//!
//! QEMU's chardev takes one client; the bridge is it. When its link ends (the stream
//! broke) the bridge connects again and says hello on a fresh link; the agent's old
//! channels end there and new ones work.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmkit_serial::{Mux, Side};
use vmkit_vsock::GuestAddr;

/// How often the bridge tries QEMU's chardev until it is there.
const CONNECT_POLL: Duration = Duration::from_millis(10);
/// How long one channel open may wait for the agent (a dialer retries after it).
const OPEN: Duration = Duration::from_secs(1);

/// The bridge's tasks; dropping it ends them and closes the link.
pub(crate) struct SerialBridge {
    tasks: Vec<JoinHandle<()>>,
    sockets: Vec<PathBuf>,
    /// The link of the moment (`None` while connecting).
    mux: watch::Receiver<Option<Mux>>,
}

impl Drop for SerialBridge {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl SerialBridge {
    /// Serves `ports` as sockets in `dir` (created 0700) over a link to QEMU's chardev
    /// at `chardev`, which QEMU creates once it runs. Returns the bridge and the agent's
    /// address for `agent_port`.
    ///
    /// # Errors
    /// The dir or a socket cannot be made.
    pub(crate) async fn start(
        chardev: PathBuf,
        dir: &Path,
        ports: &[u32],
        agent_port: u32,
    ) -> std::io::Result<(SerialBridge, GuestAddr)> {
        match tokio::fs::create_dir(dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).await?;
        let (mux_tx, mux_rx) = watch::channel(None);
        let mut tasks = vec![tokio::spawn(keep_linked(chardev, mux_tx))];
        let mut sockets = Vec::new();
        for &port in ports {
            let Some(name) = vmkit_proto::unix_socket_name(port) else {
                continue;
            };
            let path = dir.join(name);
            match tokio::fs::remove_file(&path).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let listener = UnixListener::bind(&path)?;
            tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).await?;
            sockets.push(path);
            tasks.push(tokio::spawn(serve(listener, port, mux_rx.clone())));
        }
        let addr = GuestAddr::Unix {
            dir: dir.to_owned(),
            port: agent_port,
        };
        let bridge = SerialBridge {
            tasks,
            sockets,
            mux: mux_rx,
        };
        Ok((bridge, addr))
    }

    /// The link of the moment, if connected (for a probe of the agent's side).
    pub(crate) fn mux(&self) -> Option<Mux> {
        self.mux.borrow().clone()
    }

    /// The guest closed its end of the port (QEMU's `VSERPORT_CHANGE`): its agent is
    /// gone. Only QEMU sees that — no byte crosses the link — so without this word the
    /// host would hand out its cached client, on channels nobody serves, until the next
    /// agent's hello. Every channel fails now (the cached client is seen dead and
    /// re-dialled), and new channels wait for the next agent.
    pub(crate) fn guest_closed(&self) {
        if let Some(mux) = self.mux.borrow().as_ref() {
            mux.peer_closed("the guest closed its virtio-serial port (its agent ended)");
        }
    }

    /// The sockets it serves (removed with the link).
    pub(crate) fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }
}

/// Keeps a link to QEMU's chardev: connects (retrying until QEMU made the socket),
/// publishes the mux, and connects again when the link ends.
async fn keep_linked(chardev: PathBuf, mux: watch::Sender<Option<Mux>>) {
    loop {
        let stream = loop {
            match UnixStream::connect(&chardev).await {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(CONNECT_POLL).await,
            }
        };
        let (link, _incoming) = Mux::new(stream, Side::Host);
        mux.send_replace(Some(link.clone()));
        link.wait_closed().await;
        tracing::debug!(chardev = %chardev.display(), reason = ?link.closed(), "serial link ended; reconnecting");
        mux.send_replace(None);
        tokio::time::sleep(CONNECT_POLL).await;
    }
}

/// Turns each connection to `listener` into a channel to `port`.
async fn serve(listener: UnixListener, port: u32, mux: watch::Receiver<Option<Mux>>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(CONNECT_POLL).await;
            continue;
        };
        let mut mux = mux.clone();
        tokio::spawn(async move {
            // No link yet (QEMU starting): the dialer's deadline bounds the wait.
            let Ok(link) = mux.wait_for(Option::is_some).await.map(|m| m.clone()) else {
                return;
            };
            let Some(link) = link else { return };
            let Ok(channel) = link.open(port, OPEN).await else {
                // Not answered (the agent not up yet): closing makes the dialer retry.
                return;
            };
            let (mut conn, mut channel) = (conn, channel);
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut channel).await;
        });
    }
}
