//! [`Channel`]: one stream of a [`crate::Mux`], read and written like a socket. Reads
//! return what the other side sent, in order, then end (`Ok(0)`) at its close; writes
//! wait for credit when the other side's reader is behind. A dead channel — reset, its
//! link gone, the other side restarted — fails every read and write at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::frame::{Frame, MAX_PAYLOAD};
use crate::link::{Shared, WINDOW};

/// One channel of a mux.
pub struct Channel {
    shared: Arc<Shared>,
    id: u32,
    port: u32,
    /// This side closed its sending half.
    write_closed: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.id)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Channel {
    pub(crate) fn new(shared: Arc<Shared>, id: u32, port: u32) -> Self {
        Channel {
            shared,
            id,
            port,
            write_closed: false,
        }
    }

    /// The port it was opened to.
    pub fn port(&self) -> u32 {
        self.port
    }

    fn gone(reason: &str) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, reason.to_owned())
    }
}

impl AsyncRead for Channel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut state = this.shared.state();
        let dead = state.dead.clone();
        let Some(chan) = state.channels.get_mut(&this.id) else {
            return Poll::Ready(Err(Channel::gone(
                dead.as_deref().unwrap_or("the channel is gone"),
            )));
        };
        if !chan.rx.is_empty() {
            let n = buf.remaining().min(chan.rx.len());
            let (a, b) = chan.rx.as_slices();
            let from_a = n.min(a.len());
            buf.put_slice(&a[..from_a]);
            buf.put_slice(&b[..n - from_a]);
            chan.rx.drain(..n);
            // At most WINDOW bytes are ever buffered, so n fits.
            chan.unacked += u32::try_from(n).unwrap_or(WINDOW);
            if chan.unacked >= WINDOW / 2 {
                let bytes = std::mem::take(&mut chan.unacked);
                drop(state);
                this.shared.send(&Frame::Credit {
                    channel: this.id,
                    bytes,
                });
            }
            return Poll::Ready(Ok(()));
        }
        if chan.eof {
            return Poll::Ready(Ok(()));
        }
        if let Some(reason) = &chan.failed {
            return Poll::Ready(Err(Channel::gone(reason)));
        }
        chan.rx_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Channel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "written after shutdown",
            )));
        }
        let mut state = this.shared.state();
        let dead = state.dead.clone();
        let Some(chan) = state.channels.get_mut(&this.id) else {
            return Poll::Ready(Err(Channel::gone(
                dead.as_deref().unwrap_or("the channel is gone"),
            )));
        };
        if let Some(reason) = &chan.failed {
            return Poll::Ready(Err(Channel::gone(reason)));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if chan.window == 0 {
            chan.tx_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(chan.window as usize).min(MAX_PAYLOAD);
        // n <= window, a u32.
        chan.window -= u32::try_from(n).unwrap_or(chan.window);
        drop(state);
        this.shared.send(&Frame::Data {
            channel: this.id,
            bytes: buf[..n].to_vec(),
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are handed to the link's writer as they are written.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let state = this.shared.state();
            let failed = state.channels.get(&this.id).and_then(|c| c.failed.clone());
            if let Some(reason) = failed.or_else(|| state.dead.clone()) {
                // A dead channel cannot end cleanly: the other side must not see a close.
                return Poll::Ready(Err(Channel::gone(&reason)));
            }
        }
        if !this.write_closed {
            this.write_closed = true;
            this.shared.send(&Frame::Close { channel: this.id });
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let removed = self.shared.state().channels.remove(&self.id);
        // Unless both halves already ended cleanly, the other side is told it is gone.
        let clean = removed.is_some_and(|c| c.eof) && self.write_closed;
        if !clean {
            self.shared.send(&Frame::Reset { channel: self.id });
        }
    }
}
