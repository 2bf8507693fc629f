//! End-of-stream that survives any vsock transport.
//!
//! After the header and its `OK`, both directions of a raw stream are framed: each
//! frame is a 4-byte big-endian length and that many bytes; a zero-length frame ends
//! that direction (a half-close). vhost-device-vsock turns a host `shutdown(SHUT_WR)`
//! into a full close and drops the guest's reply in flight (rust-vmm/vhost-device#874),
//! so a stream cannot rely on the transport's half-close; with frames it does not.
//!
//! [`FramedStream`] wraps a connection: writes become frames, `shutdown` sends the
//! end frame (the connection itself stays open), reads return the payloads and then
//! EOF at the peer's end frame. A connection that closes without an end frame is an
//! error (`UnexpectedEof`), so a stream cut short is never mistaken for a complete one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest payload of one frame.
pub const MAX_FRAME: usize = 64 << 10;

/// A connection speaking frames. See the module docs.
#[derive(Debug)]
pub struct FramedStream<S> {
    inner: S,
    /// Encoded frames not yet written to `inner`, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// The end frame has been queued.
    w_ended: bool,
    /// Header bytes read so far.
    header: [u8; 4],
    header_len: usize,
    /// Payload bytes left in the current frame.
    remaining: usize,
    /// The peer's end frame arrived.
    r_ended: bool,
}

impl<S> FramedStream<S> {
    /// Wraps `inner` (positioned right after the header exchange).
    pub fn new(inner: S) -> Self {
        FramedStream {
            inner,
            wbuf: Vec::with_capacity(MAX_FRAME + 4),
            wpos: 0,
            w_ended: false,
            header: [0; 4],
            header_len: 0,
            remaining: 0,
            r_ended: false,
        }
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether the peer has ended its direction.
    pub fn peer_ended(&self) -> bool {
        self.r_ended
    }

    /// Unwraps the connection (frames already queued but unflushed are lost).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncWrite + Unpin> FramedStream<S> {
    /// Writes queued frame bytes until none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.w_ended {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the stream's end frame",
            )));
        }
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_FRAME);
        // n <= MAX_FRAME, which fits a u32.
        let len = u32::try_from(n).unwrap_or(u32::MAX);
        this.wbuf.extend_from_slice(&len.to_be_bytes());
        this.wbuf.extend_from_slice(&buf[..n]);
        // Start the write now; whatever is left goes out on the next call or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    /// Sends the end frame; the connection stays open for the peer's data.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.w_ended {
            ready!(this.poll_drain(cx))?;
            this.wbuf.extend_from_slice(&0u32.to_be_bytes());
            this.w_ended = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.r_ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.remaining > 0 {
                let want = this.remaining.min(buf.remaining());
                let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                let got = part.filled().len();
                if got == 0 {
                    return Poll::Ready(Err(cut_short("inside a frame")));
                }
                // `part` filled the first `got` bytes of `buf`'s (initialised) unfilled part.
                buf.advance(got);
                this.remaining -= got;
                return Poll::Ready(Ok(()));
            }
            // Read the next header.
            let mut header = ReadBuf::new(&mut this.header[this.header_len..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut header))?;
            let got = header.filled().len();
            if got == 0 {
                return Poll::Ready(Err(cut_short(if this.header_len == 0 {
                    "before the end frame"
                } else {
                    "inside a frame header"
                })));
            }
            this.header_len += got;
            if this.header_len < 4 {
                continue;
            }
            this.header_len = 0;
            let len = u32::from_be_bytes(this.header) as usize;
            if len > MAX_FRAME {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stream frame of {len} bytes exceeds {MAX_FRAME}"),
                )));
            }
            if len == 0 {
                this.r_ended = true;
            }
            this.remaining = len;
        }
    }
}

fn cut_short(at: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the stream's connection closed {at}: the peer went away mid-stream"),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn payloads_and_the_end_frame_cross_whatever_the_chunking() {
        let (a, b) = duplex(7); // a tiny pipe: frames arrive in many pieces
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let sender = async {
            a.write_all(&data).await.unwrap();
            a.shutdown().await.unwrap();
            // The other direction still works after our end frame.
            let mut reply = Vec::new();
            a.read_to_end(&mut reply).await.unwrap();
            reply
        };
        let receiver = async {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            b.write_all(b"thanks").await.unwrap();
            b.shutdown().await.unwrap();
            got
        };
        let (reply, got) = tokio::join!(sender, receiver);
        assert!(got == data);
        assert_eq!(reply, b"thanks");
    }

    #[tokio::test]
    async fn a_connection_cut_short_is_an_error_not_an_eof() {
        let (a, b) = duplex(1024);
        let mut raw = a;
        raw.write_all(&[0, 0, 0, 5, b'a', b'b']).await.unwrap();
        drop(raw);
        let mut b = FramedStream::new(b);
        let mut got = Vec::new();
        let err = b.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"ab");

        let (a, b) = duplex(1024);
        drop(a);
        let err = FramedStream::new(b)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("before the end frame"), "{err}");
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let (mut a, b) = duplex(1024);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = FramedStream::new(b)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "stream frame of 4294967295 bytes exceeds 65536"
        );
    }
}
