//! [`Mux`]: channels over one byte stream. A reader task turns the stream into frames
//! and hands each to its channel; a writer task writes the frames channels queue. Each
//! channel has its own credit window, so a slow reader holds up only its own channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::channel::Channel;
use crate::error::Error;
use crate::frame::{Decoder, Frame, sync_pad};
use crate::link::{Chan, Shared, State, WINDOW, fail_all};

/// Which end of the link this is: the host opens odd channel ids, the guest even ones,
/// so that both may open channels without clashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The host (vmkit), usually the side that opens channels.
    Host,
    /// The guest (the agent), usually the side that accepts them.
    Guest,
}

/// Ends the link when the last [`Mux`] handle is dropped.
struct Handle {
    shared: Arc<Shared>,
    /// This side's epoch (said again by [`Mux::peer_closed`]).
    epoch: u64,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.kill("the mux was dropped");
    }
}

/// Channels over one byte stream. Cloning it shares the link; dropping the last clone
/// ends it.
#[derive(Clone)]
pub struct Mux {
    handle: Arc<Handle>,
}

/// The channels the other side opens, in order.
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<(u32, u32)>,
    shared: Arc<Shared>,
}

impl Incoming {
    /// The next channel the other side opened; `None` once the link is dead.
    pub async fn accept(&mut self) -> Option<Channel> {
        let (id, port) = self.rx.recv().await?;
        Some(Channel::new(Arc::clone(&self.shared), id, port))
    }
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("dead", &self.handle.shared.state().dead)
            .finish_non_exhaustive()
    }
}

/// A value that differs between two lives of an end (and between two muxes of one
/// process).
fn new_epoch() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    nanos ^ (u64::from(std::process::id()) << 32) ^ COUNT.fetch_add(1, Ordering::Relaxed)
}

impl Mux {
    /// Runs the link over `io` (one end of the serial port) on the current tokio
    /// runtime, as `side`. It first writes the sync pad and its `Hello`. Channels the
    /// other side opens arrive on the returned [`Incoming`].
    pub fn new<T>(io: T, side: Side) -> (Mux, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Mux::start(io, side, None)
    }

    /// [`Mux::new`], accepting channels only to `ports`: an open to another port is
    /// refused at once, as a dial to a port nobody listens on.
    pub fn serving<T>(io: T, side: Side, ports: &[u32]) -> (Mux, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Mux::start(io, side, Some(ports.to_vec()))
    }

    fn start<T>(io: T, side: Side, ports: Option<Vec<u32>>) -> (Mux, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let state = State {
            next_id: if side == Side::Host { 1 } else { 2 },
            incoming: Some(incoming_tx),
            ports,
            ..State::default()
        };
        let shared = Arc::new(Shared::new(state, out));
        let epoch = new_epoch();
        shared.send_raw(sync_pad());
        shared.send(&Frame::Hello { epoch });
        let (reader, writer) = tokio::io::split(io);
        tokio::spawn(write_frames(Arc::clone(&shared), writer, out_rx));
        tokio::spawn(read_frames(Arc::clone(&shared), reader, epoch));
        (
            Mux {
                handle: Arc::new(Handle {
                    shared: Arc::clone(&shared),
                    epoch,
                }),
            },
            Incoming {
                rx: incoming_rx,
                shared,
            },
        )
    }

    /// Opens a channel to the other side's service on `port`, waiting at most
    /// `timeout` for its answer.
    ///
    /// # Errors
    /// [`Error::Closed`] on a dead link, [`Error::Refused`] when nothing serves
    /// `port`, [`Error::PeerRestarted`] when the other side restarted meanwhile (open
    /// again), [`Error::Timeout`] when it does not answer in time.
    pub async fn open(&self, port: u32, timeout: Duration) -> Result<Channel, Error> {
        let shared = &self.handle.shared;
        let deadline = tokio::time::Instant::now() + timeout;
        if !self.await_peer(deadline).await {
            return Err(Error::Timeout {
                port,
                after: timeout,
            });
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = shared.state();
            if let Some(reason) = &state.dead {
                return Err(Error::Closed {
                    reason: reason.clone(),
                });
            }
            let id = state.next_id;
            state.next_id = state.next_id.wrapping_add(2).max(1);
            state.channels.insert(id, Chan::new());
            state.pending.insert(id, tx);
            id
        };
        shared.send(&Frame::Open { channel: id, port });
        let answer = tokio::time::timeout_at(deadline, rx).await;
        let outcome = match answer {
            Ok(Ok(Ok(()))) => return Ok(Channel::new(Arc::clone(shared), id, port)),
            Ok(Ok(Err(Error::Refused { reason, .. }))) => Err(Error::Refused { port, reason }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Closed {
                reason: "the link ended".into(),
            }),
            Err(_) => Err(Error::Timeout {
                port,
                after: timeout,
            }),
        };
        let mut state = shared.state();
        state.pending.remove(&id);
        state.channels.remove(&id);
        drop(state);
        shared.send(&Frame::Reset { channel: id });
        outcome
    }

    /// The other side's end went away without a word — its process died, which over
    /// virtio-serial only QEMU sees (the guest closed its port: `VSERPORT_CHANGE`).
    /// Every channel and open of its life fails now with `reason`, as a restart would
    /// fail them once the next life says hello; opens from now on wait (within their
    /// timeout) for that hello before they go out, so none is sent into the gap and
    /// answered by nobody, or by a life that is about to be replaced. This side's hello
    /// is said again, so a peer that is already back answers it.
    pub fn peer_closed(&self, reason: &str) {
        let shared = &self.handle.shared;
        {
            let mut state = shared.state();
            if state.dead.is_some() {
                return;
            }
            state.peer_epoch = None;
            state.awaiting_peer = true;
            fail_all(&mut state, reason, &|| Error::PeerRestarted);
        }
        shared.send(&Frame::Hello {
            epoch: self.handle.epoch,
        });
        tracing::debug!(%reason, "serial link: the other side closed its end");
    }

    /// Whether the other side's life this side knows (the one its channels are with)
    /// answers now: this side's hello is said again and the answer awaited, at most
    /// `timeout`. Nothing else crosses when the other side's process died without a
    /// word (over virtio-serial the guest holds what is written to a closed port until
    /// the port is opened again), so a `false` is the only sign of it before its next
    /// life says hello — and an answer from that next life is a `false` too. A `false`
    /// may also be a slow peer, so it changes nothing on the link.
    pub async fn peer_answers(&self, timeout: Duration) -> bool {
        let shared = &self.handle.shared;
        let mut met = shared.met.subscribe();
        met.borrow_and_update();
        let known = {
            let state = shared.state();
            match (&state.dead, state.peer_epoch) {
                (None, Some(epoch)) => epoch,
                _ => return false,
            }
        };
        shared.send(&Frame::Hello {
            epoch: self.handle.epoch,
        });
        match tokio::time::timeout(timeout, met.changed()).await {
            Ok(Ok(())) => shared.state().peer_epoch == Some(known),
            _ => false,
        }
    }

    /// Waits until the other side's next life said hello, when [`Mux::peer_closed`]
    /// said the last one ended; `false` when `deadline` passed first.
    async fn await_peer(&self, deadline: tokio::time::Instant) -> bool {
        let shared = &self.handle.shared;
        let mut met = shared.met.subscribe();
        loop {
            {
                let state = shared.state();
                if !state.awaiting_peer || state.dead.is_some() {
                    return true;
                }
            }
            match tokio::time::timeout_at(deadline, met.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Why the link is dead, once it is.
    pub fn closed(&self) -> Option<String> {
        self.handle.shared.state().dead.clone()
    }

    /// Waits until the link is dead.
    pub async fn wait_closed(&self) {
        let mut stop = self.handle.shared.stop.subscribe();
        let _ = stop.wait_for(|s| *s).await;
    }
}

/// Writes queued frames until the link dies.
async fn write_frames<W: AsyncWrite>(
    shared: Arc<Shared>,
    writer: W,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    tokio::pin!(writer);
    let mut stop = shared.stop.subscribe();
    loop {
        let bytes = tokio::select! {
            // Nothing queued after the link died goes out (a dying side's channels
            // must not look closed cleanly to the other side).
            biased;
            _ = stop.wait_for(|s| *s) => return,
            bytes = out.recv() => match bytes {
                Some(bytes) => bytes,
                None => return,
            },
        };
        if let Err(e) = writer.write_all(&bytes).await {
            shared.kill(&format!("write: {e}"));
            return;
        }
        shared.written(bytes.len());
    }
}

/// Reads frames until the stream ends or the link dies.
async fn read_frames<R: AsyncRead>(shared: Arc<Shared>, reader: R, epoch: u64) {
    tokio::pin!(reader);
    let mut stop = shared.stop.subscribe();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            n = reader.read(&mut buf) => n,
            _ = stop.wait_for(|s| *s) => return,
        };
        match n {
            Ok(0) => {
                shared.kill("the other end closed the stream");
                return;
            }
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) => {
                shared.kill(&format!("read: {e}"));
                return;
            }
        }
        let skipped = decoder.skipped();
        while let Some(frame) = decoder.next_frame() {
            handle(&shared, frame, epoch);
        }
        if decoder.skipped() > skipped {
            tracing::debug!(
                bytes = decoder.skipped() - skipped,
                "serial link: skipped what was not a whole frame"
            );
        }
    }
}

/// Applies one frame from the other side.
fn handle(shared: &Shared, frame: Frame, epoch: u64) {
    match frame {
        Frame::Hello { epoch: peer } => {
            met(shared, peer);
            shared.send(&Frame::HelloAck { epoch });
        }
        Frame::HelloAck { epoch: peer } => met(shared, peer),
        Frame::Open { channel, port } => open_asked(shared, channel, port),
        Frame::Accept { channel } => answered(shared, channel, Ok(())),
        Frame::Refuse { channel, reason } => {
            answered(shared, channel, Err(Error::Refused { port: 0, reason }));
        }
        Frame::Data { channel, bytes } => received(shared, channel, bytes),
        Frame::Credit { channel, bytes } => {
            if let Some(chan) = shared.state().channels.get_mut(&channel) {
                chan.window = chan.window.saturating_add(bytes);
                chan.wake_writer();
            }
        }
        Frame::Close { channel } => {
            if let Some(chan) = shared.state().channels.get_mut(&channel) {
                chan.eof = true;
                chan.wake_reader();
            }
        }
        Frame::Reset { channel } => {
            let reason = "reset by the other side";
            answered(
                shared,
                channel,
                Err(Error::Refused {
                    port: 0,
                    reason: reason.into(),
                }),
            );
            if let Some(chan) = shared.state().channels.get_mut(&channel) {
                chan.fail(reason);
            }
        }
    }
}

/// The other side said hello (or answered ours) as `peer`: a new epoch means it
/// restarted, and what was open with its old life is gone.
fn met(shared: &Shared, peer: u64) {
    let mut state = shared.state();
    if state.peer_epoch.is_some_and(|known| known != peer) {
        fail_all(&mut state, "the other side restarted", &|| {
            Error::PeerRestarted
        });
        tracing::debug!("serial link: the other side restarted");
    }
    state.peer_epoch = Some(peer);
    state.awaiting_peer = false;
    drop(state);
    shared.met.send_modify(|n| *n = n.wrapping_add(1));
}

/// The other side opens `channel` to `port`: accepted when this side serves it.
fn open_asked(shared: &Shared, channel: u32, port: u32) {
    let mut state = shared.state();
    let refusal = if state.channels.contains_key(&channel) {
        Some(format!("channel {channel} is already open"))
    } else if state.ports.as_ref().is_some_and(|p| !p.contains(&port)) {
        Some(format!("nothing serves port {port}"))
    } else if state.incoming.as_ref().is_none_or(|i| i.is_closed()) {
        Some("this side accepts no channels".to_owned())
    } else {
        None
    };
    match (refusal, state.incoming.clone()) {
        (None, Some(incoming)) => {
            state.channels.insert(channel, Chan::new());
            drop(state);
            shared.send(&Frame::Accept { channel });
            let _ = incoming.send((channel, port));
        }
        (refusal, _) => {
            drop(state);
            shared.send(&Frame::Refuse {
                channel,
                reason: refusal.unwrap_or_else(|| "the link is closing".to_owned()),
            });
        }
    }
}

/// The other side answered this side's open of `channel`.
fn answered(shared: &Shared, channel: u32, answer: Result<(), Error>) {
    if let Some(open) = shared.state().pending.remove(&channel) {
        let _ = open.send(answer);
    }
}

/// Bytes for `channel`: buffered for its reader, within the window this side granted.
fn received(shared: &Shared, channel: u32, bytes: Vec<u8>) {
    let mut state = shared.state();
    match state.channels.get_mut(&channel) {
        Some(chan) if chan.rx.len() + bytes.len() <= WINDOW as usize => {
            chan.rx.extend(bytes);
            chan.wake_reader();
        }
        Some(chan) => chan.fail("the other side sent past its window"),
        None => {
            drop(state);
            shared.send(&Frame::Reset { channel });
        }
    }
}
