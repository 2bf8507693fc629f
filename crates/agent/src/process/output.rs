//! One output stream of a process (stdout, stderr, or its TTY's output): a bounded
//! buffer between the process's pipe and whichever host connection is attached.
//!
//! - **Backpressure, never loss.** The pump reads the pipe only while fewer than
//!   `capacity` bytes wait to be sent; with no reader attached, or a slow one, the
//!   process blocks on its write. Nothing is ever discarded unsent.
//! - **Resume.** Bytes already written to a connection stay in a retain window of up to
//!   `capacity` bytes more, so a host whose connection died can attach again from the
//!   offset it really received (`from=`) and get what was lost in flight.
//! - **Delivered.** Once the pipe's end has been reached and every byte and the end
//!   frame written to the attached connection, the stream is delivered: what
//!   `WaitProcess` waits for.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// The most bytes moved in one read or write.
const CHUNK: usize = 64 << 10;

/// A stream's buffer; see the module docs.
#[derive(Debug)]
pub(crate) struct Output {
    capacity: usize,
    state: Mutex<State>,
    /// Bumped on every change; pumps and writers wait on it.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes from offset `start` on: retained (before `sent`) and waiting (after).
    data: VecDeque<u8>,
    start: u64,
    sent: u64,
    /// The pipe reached its end: no more bytes.
    ended: bool,
    /// Every byte and the end were written to a connection.
    delivered: bool,
    /// Which attachment writes: an older one stops.
    attachment: u64,
}

impl State {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// Drops the oldest sent bytes beyond `retain`.
    fn trim(&mut self, retain: usize) {
        let retained = usize::try_from(self.sent - self.start).unwrap_or(usize::MAX);
        let evict = retained.saturating_sub(retain);
        self.data.drain(..evict);
        self.start += evict as u64;
    }

    fn waiting(&self) -> usize {
        usize::try_from(self.end() - self.sent).unwrap_or(usize::MAX)
    }
}

/// Why an attach was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AttachError {
    /// The offset is before the retain window.
    TooOld { from: u64, start: u64 },
    /// The offset is past what the process wrote.
    Beyond { from: u64, end: u64 },
}

impl std::fmt::Display for AttachError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachError::TooOld { from, start } => write!(
                f,
                "from={from} is older than the retained output, which starts at byte {start}"
            ),
            AttachError::Beyond { from, end } => write!(
                f,
                "from={from} is past the {end} bytes the process has written"
            ),
        }
    }
}

impl Output {
    /// An empty stream holding at most `capacity` waiting bytes (and as many retained).
    pub(crate) fn new(capacity: usize) -> Output {
        Output {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few plain assignments: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether every byte and the end reached a connection.
    pub(crate) fn delivered(&self) -> bool {
        self.lock().delivered
    }

    /// Bytes held now (waiting and retained): what this stream costs in memory.
    pub(crate) fn held(&self) -> usize {
        self.lock().data.len()
    }

    /// Waits until the stream is delivered.
    pub(crate) async fn wait_delivered(&self) {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            if self.delivered() {
                return;
            }
            if changed.changed().await.is_err() {
                return; // cannot happen: `self` holds the sender
            }
        }
    }

    /// Reads `source` into the buffer until its end, never holding more than
    /// `capacity` waiting bytes. A read error (a TTY's `EIO` once the process is gone)
    /// counts as the end.
    pub(crate) async fn pump(&self, mut source: impl AsyncRead + Unpin) {
        let mut changed = self.changed.subscribe();
        let mut buf = vec![0u8; CHUNK.min(self.capacity)];
        loop {
            changed.borrow_and_update();
            let room = self.capacity.saturating_sub(self.lock().waiting());
            if room == 0 {
                if changed.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let n = source.read(&mut buf[..room.min(CHUNK)]).await.unwrap_or(0);
            let mut state = self.lock();
            if n == 0 {
                state.ended = true;
            } else {
                state.data.extend(&buf[..n]);
                state.trim(self.capacity);
            }
            drop(state);
            self.bump();
            if n == 0 {
                return;
            }
        }
    }

    /// Makes a new attachment resuming at `from`; the previous one stops writing.
    pub(crate) fn attach(&self, from: u64) -> Result<u64, AttachError> {
        let mut state = self.lock();
        if from < state.start {
            return Err(AttachError::TooOld {
                from,
                start: state.start,
            });
        }
        if from > state.end() {
            return Err(AttachError::Beyond {
                from,
                end: state.end(),
            });
        }
        state.sent = from;
        state.delivered = false;
        state.attachment += 1;
        let attachment = state.attachment;
        drop(state);
        self.bump();
        Ok(attachment)
    }

    /// Writes the stream to `to` for `attachment` (from [`Output::attach`]) until the
    /// end, which it marks with `to.shutdown()`. Returns early, `Ok`, when a newer
    /// attachment took over.
    ///
    /// # Errors
    /// A write to `to` failed (the host went away): the bytes not written stay waiting.
    pub(crate) async fn deliver(
        &self,
        attachment: u64,
        mut to: impl AsyncWrite + Unpin,
    ) -> std::io::Result<()> {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let next = {
                let state = self.lock();
                if state.attachment != attachment {
                    return Ok(());
                }
                let skip = usize::try_from(state.sent - state.start).unwrap_or(usize::MAX);
                let take = state.waiting().min(CHUNK);
                if take > 0 {
                    Some(Some(
                        state
                            .data
                            .range(skip..skip + take)
                            .copied()
                            .collect::<Vec<u8>>(),
                    ))
                } else if state.ended {
                    Some(None)
                } else {
                    None
                }
            };
            let Some(next) = next else {
                if changed.changed().await.is_err() {
                    return Ok(());
                }
                continue;
            };
            let end = next.is_none();
            match next {
                Some(chunk) => {
                    to.write_all(&chunk).await?;
                    let mut state = self.lock();
                    if state.attachment == attachment {
                        state.sent += chunk.len() as u64;
                        state.trim(self.capacity);
                    }
                }
                None => {
                    to.shutdown().await?;
                    let mut state = self.lock();
                    if state.attachment == attachment {
                        state.delivered = true;
                    }
                }
            }
            self.bump();
            if end {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A process writing 1 MiB through a 4 KiB buffer with nobody attached is held
    /// back; an attached reader gets every byte in order and the end; the stream is
    /// then delivered.
    #[tokio::test]
    async fn a_writer_is_held_back_until_a_reader_takes_every_byte() {
        let out = Arc::new(Output::new(4096));
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let (mut process, pipe) = tokio::io::duplex(1024);
        let pump = tokio::spawn({
            let out = Arc::clone(&out);
            async move { out.pump(pipe).await }
        });
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                process.write_all(&data).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!writer.is_finished(), "no reader: the process blocks");
        assert!(out.held() <= 4096, "held {} bytes", out.held());
        let (mut host, conn) = tokio::io::duplex(1024);
        let attachment = out.attach(0).unwrap();
        let deliver = tokio::spawn({
            let out = Arc::clone(&out);
            async move { out.deliver(attachment, conn).await }
        });
        let mut got = Vec::new();
        host.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        deliver.await.unwrap().unwrap();
        pump.await.unwrap();
        writer.await.unwrap();
        assert!(out.delivered());
        assert!(out.held() <= 2 * 4096);
    }

    /// A reader that goes away mid-stream: a new attachment from the offset it really
    /// received gets the rest, retained bytes included; offsets outside the window are
    /// refused, naming both numbers.
    #[tokio::test]
    async fn a_new_attachment_resumes_from_the_offset_received() {
        let out = Arc::new(Output::new(1000));
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let (mut process, pipe) = tokio::io::duplex(64);
        let pump = tokio::spawn({
            let out = Arc::clone(&out);
            async move { out.pump(pipe).await }
        });
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                process.write_all(&data).await.unwrap();
            }
        });
        // First reader: reads 700 bytes, while more were written to its connection.
        let first = out.attach(0).unwrap();
        let (mut host, conn) = tokio::io::duplex(300);
        let deliver = tokio::spawn({
            let out = Arc::clone(&out);
            async move { out.deliver(first, conn).await }
        });
        let mut got = vec![0u8; 700];
        host.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(host);
        assert!(
            deliver.await.unwrap().is_err(),
            "the dead connection is an error"
        );
        assert_eq!(
            out.attach(6000),
            Err(AttachError::Beyond {
                from: 6000,
                end: out.lock().end()
            })
        );
        let second = out.attach(700).unwrap();
        let (mut host, conn) = tokio::io::duplex(300);
        let deliver = tokio::spawn({
            let out = Arc::clone(&out);
            async move { out.deliver(second, conn).await }
        });
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
        got.extend(rest);
        assert_eq!(got, data);
        deliver.await.unwrap().unwrap();
        pump.await.unwrap();
        writer.await.unwrap();
        let too_old = out.attach(0).unwrap_err();
        assert!(matches!(too_old, AttachError::TooOld { from: 0, start } if start >= 4000));
        assert!(too_old.to_string().contains("from=0"));
    }
}
