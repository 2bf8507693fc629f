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

/// Copies `from` (a guest output) into the FIFO at `path` until it ends. `None` when
/// `path` is empty: the output is read and dropped, so the process is never held back.
pub(crate) fn output_to<R>(from: R, path: &str) -> Result<JoinHandle<()>>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let mut from = from;
    if path.is_empty() {
        return Ok(tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
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
