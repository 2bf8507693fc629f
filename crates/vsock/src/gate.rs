//! [`LinkGate`]: holds host-to-guest traffic on a hybrid-vsock link while the VM is
//! paused.
//!
//! vhost-device-vsock 0.3 ends its vring worker for good when a host connection opens,
//! sends or closes while QEMU has stopped the device's vrings (pause): the event makes
//! it walk a queue that is not ready, the walk's error ends the worker's event loop, and
//! from then on no connection to that guest is served. So while the gate is closed,
//! nothing of this process reaches the daemon's socket: a dial waits for the gate to
//! open (within its deadline), reads and writes on open connections wait (a call made
//! while paused is answered after resume), and a connection dropped meanwhile is closed
//! only once the gate opens.
//!
//! A gate is registered for the daemon's socket path ([`LinkGate::register`]); every
//! dial to a hybrid-vsock address at that path goes through it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};

use tokio::net::UnixStream;

/// The gate of one hybrid-vsock socket. Clones share it; it is open when made.
#[derive(Debug, Clone)]
pub struct LinkGate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    open: AtomicBool,
    /// Tasks waiting for the gate to open.
    waiters: Mutex<Vec<Waker>>,
    /// Connections dropped while the gate was closed, closed when it opens.
    deferred: Mutex<Vec<UnixStream>>,
}

/// Locks `mutex`, also when a panicking holder poisoned it: every critical section here
/// is a push or a take, which a panic cannot leave half done.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The gates of this process, by socket path.
fn gates() -> &'static Mutex<HashMap<PathBuf, Weak<Inner>>> {
    static GATES: OnceLock<Mutex<HashMap<PathBuf, Weak<Inner>>>> = OnceLock::new();
    GATES.get_or_init(Default::default)
}

impl LinkGate {
    /// Registers an open gate for the hybrid-vsock socket at `uds`, replacing any
    /// earlier one there. It applies to dials from this process while any clone of it
    /// lives.
    pub fn register(uds: &Path) -> LinkGate {
        let inner = Arc::new(Inner {
            path: uds.to_owned(),
            open: AtomicBool::new(true),
            waiters: Mutex::new(Vec::new()),
            deferred: Mutex::new(Vec::new()),
        });
        let mut all = lock(gates());
        all.retain(|_, gate| gate.strong_count() > 0);
        all.insert(uds.to_owned(), Arc::downgrade(&inner));
        LinkGate { inner }
    }

    /// The gate registered for `uds`, if any.
    pub(crate) fn lookup(uds: &Path) -> Option<LinkGate> {
        lock(gates())
            .get(uds)
            .and_then(Weak::upgrade)
            .map(|inner| LinkGate { inner })
    }

    /// The socket path the gate guards.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether traffic flows.
    pub fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Holds all traffic from now on (call before the VM's vrings stop).
    pub fn close(&self) {
        self.inner.open.store(false, Ordering::Release);
    }

    /// Lets traffic flow again: wakes every waiting dial, read and write, and closes the
    /// connections dropped meanwhile.
    pub fn open(&self) {
        self.inner.open.store(true, Ordering::Release);
        let waiters = std::mem::take(&mut *lock(&self.inner.waiters));
        for waker in waiters {
            waker.wake();
        }
        drop(std::mem::take(&mut *lock(&self.inner.deferred)));
    }

    /// `Ready` when the gate is open; otherwise wakes the task when it opens.
    pub(crate) fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_open() {
            return Poll::Ready(());
        }
        let mut waiters = lock(&self.inner.waiters);
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        drop(waiters);
        // Opened between the first look and the registration: do not sleep.
        if self.is_open() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until the gate is open.
    pub async fn wait_open(&self) {
        std::future::poll_fn(|cx| self.poll_open(cx)).await;
    }

    /// Keeps `stream` open until the gate opens (a close is traffic too).
    pub(crate) fn defer_close(&self, stream: UnixStream) {
        if self.is_open() {
            drop(stream);
            return;
        }
        lock(&self.inner.deferred).push(stream);
        // Opened meanwhile: `open` may have taken the list before our push.
        if self.is_open() {
            drop(std::mem::take(&mut *lock(&self.inner.deferred)));
        }
    }

    /// How many dropped connections wait for the gate to open.
    pub fn deferred(&self) -> usize {
        lock(&self.inner.deferred).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_sleep_while_closed_and_wake_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let gate = LinkGate::register(&dir.path().join("vsock.sock"));
        gate.wait_open().await;
        gate.close();
        let waiting = tokio::time::timeout(Duration::from_millis(50), gate.wait_open()).await;
        assert!(waiting.is_err(), "a closed gate holds its waiters");
        let opener = gate.clone();
        let task = tokio::spawn(async move { opener.wait_open().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.open();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("woken on open")
            .unwrap();
    }

    #[tokio::test]
    async fn a_gate_is_found_by_its_path_while_it_lives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let gate = LinkGate::register(&path);
        assert_eq!(LinkGate::lookup(&path).unwrap().path(), path);
        drop(gate);
        assert!(LinkGate::lookup(&path).is_none());
    }

    #[tokio::test]
    async fn a_connection_dropped_while_closed_is_closed_on_open() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let gate = LinkGate::register(&dir.path().join("vsock.sock"));
        gate.close();
        gate.defer_close(ours);
        assert_eq!(gate.deferred(), 1);
        let mut byte = [0u8; 1];
        use tokio::io::AsyncReadExt;
        let early = tokio::time::timeout(Duration::from_millis(50), peer.read(&mut byte)).await;
        assert!(
            early.is_err(),
            "the peer sees no close while the gate is closed"
        );
        gate.open();
        let n = tokio::time::timeout(Duration::from_secs(1), peer.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "closed once the gate opened");
        assert_eq!(gate.deferred(), 0);
    }
}
