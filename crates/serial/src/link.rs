//! The state of one link, shared by the mux's tasks and its channels: each channel's
//! buffers, window and wakers, the opens waiting for an answer, the other side's epoch,
//! and why the link died once it did.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::Error;
use crate::frame::Frame;

/// How many bytes a sender may have in flight on one channel before the receiver's
/// reader has consumed them.
pub(crate) const WINDOW: u32 = 256 << 10;

/// One channel's state, shared by the reader task and the [`Channel`].
#[derive(Debug)]
pub(crate) struct Chan {
    /// Bytes received and not yet read.
    pub(crate) rx: VecDeque<u8>,
    pub(crate) rx_waker: Option<Waker>,
    /// The other side closed its sending half.
    pub(crate) eof: bool,
    /// Why the channel is dead, once it is.
    pub(crate) failed: Option<String>,
    /// Bytes this side may still send.
    pub(crate) window: u32,
    pub(crate) tx_waker: Option<Waker>,
    /// Bytes read since the last credit sent.
    pub(crate) unacked: u32,
}

impl Chan {
    pub(crate) fn new() -> Self {
        Chan {
            rx: VecDeque::new(),
            rx_waker: None,
            eof: false,
            failed: None,
            window: WINDOW,
            tx_waker: None,
            unacked: 0,
        }
    }

    /// Marks the channel dead and wakes whoever waits on it.
    pub(crate) fn fail(&mut self, reason: &str) {
        if self.failed.is_none() {
            self.failed = Some(reason.to_owned());
        }
        self.wake();
    }

    fn wake(&mut self) {
        self.wake_reader();
        self.wake_writer();
    }

    /// Wakes a read waiting for bytes.
    pub(crate) fn wake_reader(&mut self) {
        if let Some(w) = self.rx_waker.take() {
            w.wake();
        }
    }

    /// Wakes a write waiting for credit.
    pub(crate) fn wake_writer(&mut self) {
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
    }
}

/// The link's state.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) channels: HashMap<u32, Chan>,
    /// Opens waiting for the other side's answer.
    pub(crate) pending: HashMap<u32, oneshot::Sender<Result<(), Error>>>,
    pub(crate) next_id: u32,
    /// The other side's epoch, once it said hello.
    pub(crate) peer_epoch: Option<u64>,
    /// The other side's last life ended without a word ([`crate::Mux::peer_closed`]):
    /// opens wait for its next hello before they go out.
    pub(crate) awaiting_peer: bool,
    /// Where accepted channels go (as their ids); `None` once the link is dead.
    pub(crate) incoming: Option<mpsc::UnboundedSender<(u32, u32)>>,
    /// Why the link is dead, once it is.
    pub(crate) dead: Option<String>,
    /// The ports this side serves (`None`: any).
    pub(crate) ports: Option<Vec<u32>>,
}

/// The most bytes this side lets wait for its writer. What is queued is bounded by the
/// credit windows of this side's own channels plus its answers to the other side's
/// frames (a refused open, a reset, a hello's answer); a peer that reads nothing while
/// it sends frames that each ask for an answer would make that grow without end. Past
/// this the link ends: such a peer is dead or hostile.
pub const MAX_QUEUED: usize = 16 << 20;

/// What the mux's tasks and channels share.
pub(crate) struct Shared {
    state: Mutex<State>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes queued for the writer and not written yet.
    queued: AtomicUsize,
    /// Ticks `true` when the link dies (the tasks stop).
    pub(crate) stop: watch::Sender<bool>,
    /// Ticks on every hello (or answer) from the other side: what opens waiting for
    /// its next life wake on.
    pub(crate) met: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new(state: State, out: mpsc::UnboundedSender<Vec<u8>>) -> Self {
        Shared {
            state: Mutex::new(state),
            out,
            queued: AtomicUsize::new(0),
            stop: watch::channel(false).0,
            met: watch::channel(0).0,
        }
    }

    /// Queues raw bytes (the sync pad) for the writer task; past [`MAX_QUEUED`] the link
    /// ends instead. Never called with the state locked ([`Shared::kill`] takes it).
    pub(crate) fn send_raw(&self, bytes: Vec<u8>) {
        let len = bytes.len();
        let queued = self.queued.fetch_add(len, Ordering::Relaxed) + len;
        if queued > MAX_QUEUED {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.kill(&format!(
                "the other side reads nothing: {} MiB wait to be written to it",
                MAX_QUEUED >> 20
            ));
            return;
        }
        if self.out.send(bytes).is_err() {
            // The writer is gone with the link: nothing waits.
            self.queued.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// The writer wrote `n` queued bytes.
    pub(crate) fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few field updates: a panic cannot leave the
        // state half-changed, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` for the writer task (a dead link drops it; see
    /// [`Shared::send_raw`]).
    pub(crate) fn send(&self, frame: &Frame) {
        self.send_raw(frame.encode());
    }

    /// Ends the link: every channel, every open and the acceptor fail with `reason`.
    pub(crate) fn kill(&self, reason: &str) {
        {
            let mut state = self.state();
            if state.dead.is_some() {
                return;
            }
            state.dead = Some(reason.to_owned());
            fail_all(&mut state, reason, &|| Error::Closed {
                reason: reason.to_owned(),
            });
            state.incoming = None;
        }
        self.stop.send_replace(true);
        tracing::debug!(%reason, "serial link closed");
    }
}

/// Fails every channel with `reason` and every open with `error()`.
pub(crate) fn fail_all(state: &mut State, reason: &str, error: &dyn Fn() -> Error) {
    for chan in state.channels.values_mut() {
        chan.fail(reason);
    }
    for (_, open) in state.pending.drain() {
        let _ = open.send(Err(error()));
    }
}
