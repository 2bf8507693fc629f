//! A process's stdio streams on the host: each a framed connection to the agent's
//! stream port, attached to one stream of the process.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmkit_core::GuestStream;
use vmkit_proto::FramedStream;

/// The connection under every stdio stream.
pub(crate) type Conn = FramedStream<Box<dyn GuestStream>>;

/// An output of the process (stdout or stderr). Reading ends at the process's end of
/// output; a connection cut short is an `UnexpectedEof` error, after which
/// [`crate::Processes::attach`] resumes at [`Output::received`]. Reads are as fast as the
/// caller's: a caller that stops reading holds the process back (nothing is dropped).
pub struct Output {
    conn: Conn,
    received: u64,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Output {
    pub(crate) fn new(conn: Conn, from: u64) -> Output {
        Output {
            conn,
            received: from,
        }
    }

    /// The offset of the next byte: bytes of this stream received so far, counting
    /// those received before a reattach.
    pub fn received(&self) -> u64 {
        self.received
    }
}

fn counted<S: AsyncRead + Unpin>(
    inner: &mut S,
    received: &mut u64,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let before = buf.filled().len();
    let polled = Pin::new(inner).poll_read(cx, buf);
    if let Poll::Ready(Ok(())) = polled {
        *received += (buf.filled().len() - before) as u64;
    }
    polled
}

/// The process's stdin. `shutdown()` closes it (the process reads end of file);
/// writes wait while the process does not read (its pipe and the agent's buffers are
/// full).
pub struct Stdin {
    conn: Conn,
}

impl std::fmt::Debug for Stdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stdin").finish_non_exhaustive()
    }
}

impl Stdin {
    pub(crate) fn new(conn: Conn) -> Stdin {
        Stdin { conn }
    }
}

/// The process's TTY: what it writes (read here) and the keys it gets (written here;
/// `0x03` is Ctrl-C). `shutdown()` sends Ctrl-D.
pub struct Tty {
    conn: Conn,
    received: u64,
}

impl std::fmt::Debug for Tty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tty")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Tty {
    pub(crate) fn new(conn: Conn, from: u64) -> Tty {
        Tty {
            conn,
            received: from,
        }
    }

    /// The offset of the next byte of output (see [`Output::received`]).
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// `AsyncRead` for a stream type with `conn` and `received`: reads count into it.
macro_rules! counted_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let this = self.get_mut();
                counted(&mut this.conn, &mut this.received, cx, buf)
            }
        }
    };
}

/// `AsyncWrite` for a stream type with `conn`: straight through (`shutdown` sends the
/// end frame).
macro_rules! forward_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.get_mut().conn).poll_write(cx, buf)
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().conn).poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().conn).poll_shutdown(cx)
            }
        }
    };
}

counted_read!(Output);
counted_read!(Tty);
forward_write!(Stdin);
forward_write!(Tty);
