//! A process's input: its stdin pipe, or its TTY's primary side. One host connection
//! feeds it at a time; a newer one, or `CloseStdin`, stops the one before.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, watch};

/// Where the host's bytes go.
type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// The byte a terminal sends for end of input (Ctrl-D).
const EOT: u8 = 0x04;

/// A process's input; see the module docs.
pub(crate) struct Input {
    /// `None` once closed.
    sink: Mutex<Option<Sink>>,
    /// A TTY: closing sends [`EOT`] instead of closing the primary (which is also the
    /// output's source).
    tty: bool,
    /// Bumped by each new feeder and by a close; a feeder stops when it moves.
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("tty", &self.tty)
            .finish_non_exhaustive()
    }
}

/// How a feeder ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fed {
    /// The host's end of data: the input was closed.
    Closed,
    /// The host's connection broke, the process stopped reading, or a newer feeder or
    /// a close took over: the input stays as it is.
    Stopped,
}

impl Input {
    /// Input into `sink`; `tty` for a TTY's primary side.
    pub(crate) fn new(sink: Sink, tty: bool) -> Input {
        Input {
            sink: Mutex::new(Some(sink)),
            tty,
            generation: watch::channel(0).0,
        }
    }

    fn take_over(&self) -> (u64, watch::Receiver<u64>) {
        let mut mine = 0;
        self.generation.send_modify(|g| {
            *g = g.wrapping_add(1);
            mine = *g;
        });
        (mine, self.generation.subscribe())
    }

    /// Copies `from` into the input until the host's end of data (then closes the input),
    /// an error, or a newer feeder.
    pub(crate) async fn feed(&self, mut from: impl AsyncRead + Unpin) -> Fed {
        let (mine, mut generation) = self.take_over();
        let superseded = async move {
            let _ = generation.wait_for(|g| *g != mine).await;
        };
        tokio::pin!(superseded);
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(n) => n,
                    Err(_) => return Fed::Stopped,
                },
                () = &mut superseded => return Fed::Stopped,
            };
            if n == 0 {
                self.close().await;
                return Fed::Closed;
            }
            let mut sink = tokio::select! {
                sink = self.sink.lock() => sink,
                () = &mut superseded => return Fed::Stopped,
            };
            let Some(to) = sink.as_mut() else {
                return Fed::Stopped;
            };
            let written = tokio::select! {
                written = to.write_all(&buf[..n]) => written,
                () = &mut superseded => return Fed::Stopped,
            };
            if written.is_err() {
                return Fed::Stopped; // the process closed its stdin or exited
            }
        }
    }

    /// Closes the input (a TTY gets Ctrl-D instead) and stops any feeder. Closing twice
    /// is harmless.
    pub(crate) async fn close(&self) {
        self.take_over();
        let mut sink = self.sink.lock().await;
        if self.tty {
            if let Some(to) = sink.as_mut() {
                let _ = to.write_all(&[EOT]).await;
            }
        } else {
            *sink = None;
        }
    }
}
