//! Raw streams to the agent's stream port: dial, send the header, read the answer.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use vmkit_proto::{FramedStream, MAX_HEADER, StreamHeader, StreamReply};

use crate::dial::{GuestConn, dial};
use crate::error::{Error, Result};
use vmkit_core::GuestAddr;

/// A raw stream to the agent: the connection in frames. Write, then `shutdown()` to
/// end your side (the connection stays open); read until EOF, which is the agent's end
/// of the stream (a connection cut short is an `UnexpectedEof` error instead).
pub type AgentStream = FramedStream<GuestConn>;

/// Opens a raw stream at `addr` (the agent's stream port): one dial, the header, and
/// the agent's `OK`, all within `timeout`.
///
/// # Errors
/// [`Error::Dial`] when the connection fails, [`Error::Stream`] when the header cannot
/// be sent, the agent refuses (its reason is in the message) or answers nonsense, or the
/// time runs out.
pub async fn open_stream(
    addr: &GuestAddr,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<AgentStream> {
    let deadline = Instant::now() + timeout;
    let conn = dial(addr, timeout).await?;
    let left = deadline.saturating_duration_since(Instant::now());
    begin_stream(conn, header, left, &addr.to_string()).await
}

/// Starts a raw stream on a connection already open to the agent's stream port (e.g.
/// from `GuestCommunicator::start_stream`): the header and the agent's `OK`, within
/// `timeout`. `peer` names the connection in errors.
///
/// # Errors
/// [`Error::Stream`], as for [`open_stream`].
pub async fn begin_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    header: &StreamHeader,
    timeout: Duration,
    peer: &str,
) -> Result<FramedStream<S>> {
    let kind = header.kind();
    let fail = |cause: String| Error::Stream {
        addr: peer.to_owned(),
        kind,
        cause,
    };
    let line = header.encode().map_err(|e| fail(e.to_string()))?;
    let exchange = async {
        conn.write_all(&line)
            .await
            .map_err(|e| fail(format!("write the header: {e}")))?;
        let mut reply = Vec::with_capacity(8);
        // A byte at a time: the stream's own bytes may follow the reply at once.
        while reply.last() != Some(&b'\n') {
            if reply.len() >= MAX_HEADER {
                return Err(fail(format!(
                    "the agent's reply exceeds {MAX_HEADER} bytes"
                )));
            }
            match conn.read_u8().await {
                Ok(b) => reply.push(b),
                Err(e) => return Err(fail(format!("read the agent's reply: {e}"))),
            }
        }
        match StreamReply::parse(&reply).map_err(|e| fail(e.to_string()))? {
            StreamReply::Ok => Ok(()),
            StreamReply::Err(reason) => Err(fail(format!("the agent refused: {reason}"))),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => Ok(FramedStream::new(conn)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(fail(format!("no answer to the header within {timeout:?}"))),
    }
}
