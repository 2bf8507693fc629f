//! What callers may hold in the agent, so that no caller (a buggy host, or anyone who
//! reaches the vsock port) can exhaust a small guest's memory or its file table:
//!
//! - **Connections**: at most [`Limits::max_connections`] TTRPC connections and
//!   [`Limits::max_streams`] stream connections; one more is closed at once (the caller sees its connection end and may try again later).
//! - **Request bodies**: a body over [`SMALL_BODY`] is read only once
//!   [`Limits::body_budget`] bytes, shared by every connection, can cover its declared
//!   length, and every body grows as its bytes arrive instead of being allocated from
//!   the declared length. A connection that waits for budget is not read, so its sender
//!   is held back by the transport. Small bodies (every call but a large `Exec` stdin)
//!   never wait: a flood of large ones cannot starve `Ping`.
//! - **Processes**: at most [`Limits::max_processes`] held at once (one more spawn is
//!   refused), each output buffering at most [`Limits::output_buffer`] bytes waiting for
//!   its reader (the process blocks beyond) and as many retained for a reconnect. With
//!   the defaults, 128 processes hold at most 128 MiB of output and about 800 fds.
//! - **Time**: a frame must arrive whole within [`Limits::frame_timeout`] once its header
//!   began; a connection with no request in flight that sends nothing for
//!   [`Limits::idle_timeout`] is closed (the host's client re-dials).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies up to this size need no budget: each connection has at most one being read,
/// so they cost at most `max_connections` × 64 KiB.
pub(crate) const SMALL_BODY: usize = 64 << 10;

/// The agent's limits; [`Limits::default`] is what a guest runs with.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TTRPC connections at once.
    pub max_connections: usize,
    /// Stream connections at once (each process with pipes holds three while attached).
    pub max_streams: usize,
    /// Bytes of request bodies being read or served at once, over all connections.
    pub body_budget: usize,
    /// How long a started frame may take to arrive.
    pub frame_timeout: Duration,
    /// How long a connection with nothing in flight may stay silent.
    pub idle_timeout: Duration,
    /// Processes the process service holds at once (running, or exited and not yet
    /// waited for); one more spawn is refused.
    pub max_processes: usize,
    /// Output bytes each process stream may hold waiting for its reader; as many
    /// again are retained for a reconnecting host. A process whose reader falls this
    /// far behind blocks on its write.
    pub output_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_streams: 512,
            // Four frames of TTRPC's largest size (4 MiB) at once.
            body_budget: 16 << 20,
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_processes: 128,
            output_buffer: 256 << 10,
        }
    }
}

/// Admits connections up to a limit; each admitted one holds a [`Admission`].
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    slots: Arc<Semaphore>,
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Admission {
    _slot: OwnedSemaphorePermit,
}

impl Gate {
    pub(crate) fn new(max: usize) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// A place for one more connection, or `None` when all are taken.
    pub(crate) fn admit(&self) -> Option<Admission> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .ok()
            .map(|slot| Admission { _slot: slot })
    }
}

/// The body budget shared by every connection.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// Budget held for one body, from before it is read until its call is answered.
#[derive(Debug)]
pub(crate) struct Held {
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Held {
    /// No budget held: a small body.
    pub(crate) fn none() -> Held {
        Held { _bytes: None }
    }
}

impl Budget {
    pub(crate) fn new(total: usize) -> Budget {
        Budget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Waits until `len` bytes are free and holds them. `len` is at most TTRPC's
    /// 4 MiB frame limit (checked before); a budget smaller than that is clamped.
    pub(crate) async fn hold(&self, len: usize) -> Held {
        if len <= SMALL_BODY {
            return Held::none();
        }
        let want = u32::try_from(len.min(self.total)).unwrap_or(u32::MAX);
        // The semaphore lives in `self` and is never closed, so acquiring cannot fail.
        let permit = Arc::clone(&self.bytes).acquire_many_owned(want).await.ok();
        Held { _bytes: permit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_up_to_its_limit_and_frees_places() {
        let gate = Gate::new(2);
        let a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert!(gate.admit().is_none());
        drop(a);
        assert!(gate.admit().is_some());
    }

    #[tokio::test]
    async fn the_budget_holds_bodies_back_until_bytes_are_free() {
        const BIG: usize = SMALL_BODY + 1;
        let budget = Budget::new(3 * BIG);
        let first = budget.hold(2 * BIG).await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.hold(2 * BIG)).await;
        assert!(waiting.is_err(), "two more bodies do not fit");
        let _small = tokio::time::timeout(Duration::from_millis(50), budget.hold(SMALL_BODY))
            .await
            .expect("a small body never waits");
        drop(first);
        let _second = tokio::time::timeout(Duration::from_millis(50), budget.hold(2 * BIG))
            .await
            .expect("they fit once the first body is done");
        // A body larger than the whole budget waits for all of it, not for ever.
        let all = Budget::new(BIG);
        let _big = tokio::time::timeout(Duration::from_millis(50), all.hold(4 * BIG))
            .await
            .expect("clamped to the budget");
    }
}
