//! The VM's life: its state, the stop that ends it, and its exit. [`Lifecycle`] is the
//! only code that changes the state (each change published as
//! [`VmEvent::StateChanged`]), owns the cancel signal a stop sends to a start or a
//! hot-plug in flight, and owns the exit every `wait` and `shutdown` caller reads.
//!
//! A stop is begun once: [`Lifecycle::begin_stop`] hands the first caller a
//! [`StopGuard`]; later callers wait for the exit. A stop that finds a start in flight
//! awaits the start's outcome ([`Lifecycle::start_settled`]) instead of polling.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{broadcast, watch};
use vmkit_core::{ExitInfo, StateCell, VmEvent, VmState};

/// The state, stop and exit of one VM.
pub(crate) struct Lifecycle {
    state: StateCell,
    /// Ticks on every state change, for waiters (see [`Lifecycle::start_settled`]).
    changed: watch::Sender<VmState>,
    events: broadcast::Sender<VmEvent>,
    /// `true` once a stop began; a start or hot-plug in flight ends early.
    cancel: watch::Sender<bool>,
    /// A [`StopGuard`] is alive: the exit is its holder's to report.
    stopping: AtomicBool,
    /// `Some` once the VM is gone.
    exit: watch::Sender<Option<ExitInfo>>,
    /// Held while the VM's life is being ended, so nobody sees the exit before
    /// everything is released.
    ending: tokio::sync::Mutex<()>,
    /// Held by a pause or resume, so run-state changes happen one at a time.
    run_changes: tokio::sync::Mutex<()>,
}

/// Proof that its holder runs the VM's one stop. Dropped without the VM ending (the
/// stopping caller's future was dropped), it hands the exit back to the process
/// monitor.
pub(crate) struct StopGuard<'a> {
    life: &'a Lifecycle,
}

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.life.stopping.store(false, Ordering::Release);
    }
}

impl Lifecycle {
    /// A VM in `New`, publishing on `events`.
    pub(crate) fn new(events: broadcast::Sender<VmEvent>) -> Self {
        Lifecycle {
            state: StateCell::new(),
            changed: watch::channel(VmState::New).0,
            events,
            cancel: watch::channel(false).0,
            stopping: AtomicBool::new(false),
            exit: watch::channel(None).0,
            ending: tokio::sync::Mutex::new(()),
            run_changes: tokio::sync::Mutex::new(()),
        }
    }

    /// The current state.
    pub(crate) fn state(&self) -> VmState {
        self.state.get()
    }

    /// Fails with `InvalidState` for `op` unless the state is one of `allowed`.
    pub(crate) fn require(&self, op: &'static str, allowed: &[VmState]) -> vmkit_core::Result<()> {
        self.state.require(op, allowed).map(drop)
    }

    /// A checked `from → to` for `op`, published as [`VmEvent::StateChanged`].
    pub(crate) fn transition(
        &self,
        op: &'static str,
        from: VmState,
        to: VmState,
    ) -> vmkit_core::Result<()> {
        self.state.transition(op, from, to)?;
        self.publish(from, to);
        Ok(())
    }

    fn publish(&self, from: VmState, to: VmState) {
        self.changed.send_replace(to);
        let _ = self.events.send(VmEvent::StateChanged { from, to });
    }

    /// Makes the run state what QEMU reports (`running`: its vCPUs run): `Running ↔
    /// Paused` only; any other state is left alone. Returns whether it changed.
    pub(crate) fn follow_qemu(&self, running: bool) -> bool {
        let (from, to) = if running {
            (VmState::Paused, VmState::Running)
        } else {
            (VmState::Running, VmState::Paused)
        };
        // Not `from` (already there, starting, or gone): nothing to follow.
        self.transition("follow QEMU's run state", from, to).is_ok()
    }

    /// Begins the VM's one stop: the first caller gets the guard (and every start or
    /// hot-plug in flight is told to end); `None` for later callers, who wait for the
    /// exit instead.
    pub(crate) fn begin_stop(&self) -> Option<StopGuard<'_>> {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.cancel.send_replace(true);
        Some(StopGuard { life: self })
    }

    /// Whether a stop is under way and the VM has not ended yet.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire) && self.exit.borrow().is_none()
    }

    /// Whether the exit is the stopping caller's to report (a stop guard is alive).
    pub(crate) fn stop_owns_exit(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Resolves once a stop has begun.
    pub(crate) fn cancelled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.cancel.subscribe();
        async move {
            // The sender lives as long as the lifecycle; a closed channel means it is
            // gone, which is a stop too.
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Waits until the state is no longer `Starting` (a cancelled start has finished
    /// releasing, or it won the race and the VM runs). Returns the state then.
    pub(crate) async fn start_settled(&self) -> VmState {
        // `changed` only wakes the waiter; the cell is the truth (two changes racing
        // may publish out of order).
        let mut rx = self.changed.subscribe();
        let _ = rx.wait_for(|_| self.state() != VmState::Starting).await;
        self.state()
    }

    /// The exit, once the VM is gone.
    pub(crate) fn exit(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Waits until the VM is gone.
    pub(crate) async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(info) => info.clone().unwrap_or_else(ExitInfo::never_started),
            // The sender lives in `self`, which we borrow.
            Err(_) => ExitInfo::never_started(),
        }
    }

    /// One pause or resume at a time: the returned guard is held while it runs.
    pub(crate) async fn one_run_change(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.run_changes.lock().await
    }

    /// Ends the VM's life: awaits `release` (what the boot took), moves to `Shutdown`
    /// and publishes `info`. The first call wins; a later call waits for it, drops its
    /// `release` unawaited, and gets the exit in force.
    pub(crate) async fn end(
        &self,
        vm: &str,
        info: ExitInfo,
        release: impl std::future::Future<Output = ()>,
    ) -> ExitInfo {
        let _ending = self.ending.lock().await;
        if let Some(first) = self.exit() {
            return first;
        }
        release.await;
        if let Ok(from) = self
            .state
            .transition_from_any("shutdown", VmState::Shutdown)
        {
            self.publish(from, VmState::Shutdown);
        }
        tracing::info!(%vm, reason = ?info.reason, stage = ?info.stage, "VM gone");
        let _ = self.events.send(VmEvent::Exited(info.clone()));
        self.exit.send_replace(Some(info.clone()));
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_core::ExitReason;

    fn life() -> (Lifecycle, broadcast::Receiver<VmEvent>) {
        let (tx, rx) = broadcast::channel(16);
        (Lifecycle::new(tx), rx)
    }

    #[tokio::test]
    async fn one_stop_and_the_first_exit_wins() {
        let (life, _) = life();
        let guard = life.begin_stop().expect("the first stop");
        assert!(life.begin_stop().is_none(), "a second stop waits instead");
        assert!(life.is_stopping());
        let first = ExitInfo {
            reason: ExitReason::HostShutdown,
            ..ExitInfo::never_started()
        };
        assert_eq!(
            life.end("vm", first.clone(), async {}).await.reason,
            ExitReason::HostShutdown
        );
        let again = life.end("vm", ExitInfo::never_started(), async {
            panic!("a later end releases nothing")
        });
        assert_eq!(again.await.reason, ExitReason::HostShutdown);
        assert!(!life.is_stopping(), "ended");
        assert_eq!(life.state(), VmState::Shutdown);
        drop(guard);
        assert_eq!(life.wait_exit().await.reason, ExitReason::HostShutdown);
    }

    #[tokio::test]
    async fn a_dropped_guard_hands_the_exit_back() {
        let (life, _) = life();
        let guard = life.begin_stop().unwrap();
        assert!(life.stop_owns_exit());
        drop(guard);
        assert!(!life.stop_owns_exit());
        // The cancel stays: a start or hot-plug in flight was told to end.
        tokio::time::timeout(std::time::Duration::from_secs(1), life.cancelled())
            .await
            .expect("cancelled stays set");
    }

    #[tokio::test]
    async fn a_stop_awaits_the_start_without_polling() {
        let (life, mut events) = life();
        life.transition("start", VmState::New, VmState::Starting)
            .unwrap();
        let settled = life.start_settled();
        tokio::pin!(settled);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), &mut settled)
                .await
                .is_err(),
            "still starting"
        );
        life.transition("start", VmState::Starting, VmState::Running)
            .unwrap();
        assert_eq!(settled.await, VmState::Running);
        assert!(life.follow_qemu(false));
        assert!(!life.follow_qemu(false), "already paused");
        let mut seen = Vec::new();
        while let Ok(VmEvent::StateChanged { to, .. }) = events.try_recv() {
            seen.push(to);
        }
        assert_eq!(seen, [VmState::Starting, VmState::Running, VmState::Paused]);
    }
}
