//! A container process's stdio: containerd hands the shim FIFO paths; the shim copies
//! between them and the guest process's streams. The FIFOs are opened read-write, so
//! opening never waits for containerd's end and a reader that comes late loses nothing.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// The FIFO paths of one process (empty: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StdioPaths {
    pub(crate) stdin: String,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) terminal: bool,
}

fn check(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::unsupported(
            "open stdio",
            format!("{path:?}: only FIFO paths are supported (no log URIs)"),
        ));
    }
    Ok(())
}

/// The last bytes of an output nobody reads (crun's errors, for a container started
/// without stdio).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tail(Arc<std::sync::Mutex<Vec<u8>>>);

impl Tail {
    /// How much of the end is kept.
    const KEEP: usize = 4096;

    fn push(&self, bytes: &[u8]) {
        let mut tail = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tail.extend_from_slice(bytes);
        let excess = tail.len().saturating_sub(Tail::KEEP);
        tail.drain(..excess);
    }

    /// What was kept, as text.
    pub(crate) fn text(&self) -> String {
        let tail = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&tail).trim().to_owned()
    }
}

/// Copies `from` (a guest output) into the FIFO at `path` until it ends. When `path`
/// is empty the output is read (the process is never held back) and its end kept in
/// `tail`.
pub(crate) fn output_to<R>(from: R, path: &str, tail: &Tail) -> Result<JoinHandle<()>>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let mut from = from;
    if path.is_empty() {
        let tail = tail.clone();
        return Ok(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            while let Ok(n) = from.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.push(&buf[..n]);
            }
        }));
    }
    check(path)?;
    let mut fifo = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(Error::io(format!("open stdio FIFO {path}")))?;
    let path = path.to_owned();
    Ok(tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut from, &mut fifo).await {
            log::warn!("copy to {path}: {e}");
        }
    }))
}

/// The stdin copier: [`StdinPump::close`] ends it (containerd's CloseIO) once what
/// the FIFO holds has been passed on.
#[derive(Debug, Clone)]
pub(crate) struct StdinPump {
    close: Arc<Notify>,
}

impl StdinPump {
    /// Copies the FIFO at `path` into `to` until [`StdinPump::close`]; then shuts `to`
    /// down (the process reads end of file).
    pub(crate) fn start<W>(path: &str, to: W) -> Result<StdinPump>
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        check(path)?;
        let mut fifo = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(path)
            .map_err(Error::io(format!("open stdin FIFO {path}")))?;
        let close = Arc::new(Notify::new());
        let closed = close.clone();
        let mut to = to;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                tokio::select! {
                    read = fifo.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
                    },
                    () = closed.notified() => {
                        // What was written before the close is passed on.
                        while let Ok(n) = fifo.try_read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        break;
                    }
                }
            }
            let _ = to.shutdown().await;
        });
        Ok(StdinPump { close })
    }

    /// Ends the copy: the process's stdin is closed.
    pub(crate) fn close(&self) {
        self.close.notify_one();
    }
}
