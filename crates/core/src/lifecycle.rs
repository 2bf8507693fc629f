//! [`Lifecycle`]: what every backend's instance needs to keep the contract's life cycle
//! — the state (one [`StateCell`], every change published as
//! [`VmEvent::StateChanged`]), the events, the one stop and the one exit every `wait`
//! and `shutdown` caller reads, a start that a dropped future cannot leave half done,
//! and cleanup that runs however the VM ends. A backend writes only what is its own:
//! how to boot, how to stop, what to release.
//!
//! - [`Lifecycle::begin_start`] moves `New → Starting` and hands back a
//!   [`StartAttempt`]: [`StartAttempt::running`] finishes the start; dropped before (the
//!   caller's `start` future was dropped: a cancellation) it ends the VM as a failed
//!   start, running the cleanup hooks, so nothing is left and the state is `Shutdown`.
//! - [`Lifecycle::end`] ends the VM once: awaits the backend's release, runs the hooks,
//!   moves to `Shutdown`, publishes `Exited`; later callers get the first exit.
//!   [`Lifecycle::end_now`] does the same without awaiting (for `Drop`s).
//! - [`Lifecycle::on_end`] registers a cleanup hook (kill a helper process, remove a
//!   socket, release a lock): it runs exactly once when the VM ends, or when the
//!   lifecycle is dropped with the VM still alive.
//! - [`Lifecycle::begin_stop`] makes the stop one: the first caller gets a
//!   [`StopGuard`], a start or operation in flight is told through
//!   [`Lifecycle::cancelled`], later callers [`Lifecycle::wait_exit`].
//! - [`Lifecycle::unsupported`]: the contract's "wrong state first, then
//!   `Unsupported`" for what a backend does not offer.
//!
//! ```
//! use vmkit_core::{ExitInfo, ExitReason, Lifecycle, VmEvent, VmState};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let life = Lifecycle::new();
//! let mut events = life.events();
//! let attempt = life.begin_start("start").unwrap(); // New → Starting
//! // … boot the VMM; register what must go however the VM ends:
//! life.on_end(|| { /* kill the VMM, remove its socket */ });
//! attempt.running().unwrap(); // Starting → Running
//! let exit = life.end(ExitInfo { reason: ExitReason::HostShutdown, ..ExitInfo::never_started() }, async {}).await;
//! assert_eq!(life.state(), VmState::Shutdown);
//! assert_eq!(life.wait_exit().await, exit);
//! assert!(matches!(events.try_recv(), Ok(VmEvent::StateChanged { to: VmState::Starting, .. })));
//! # });
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{broadcast, watch};

use crate::error::{Error, Result};
use crate::info::{ExitInfo, ExitReason, VmEvent};
use crate::state::VmState;
use crate::state_cell::StateCell;

/// How many events a subscriber may fall behind before it sees `Lagged`.
const EVENTS: usize = 256;

/// A cleanup hook (see [`Lifecycle::on_end`]).
type Hook = Box<dyn FnOnce() + Send>;

/// The state, events, stop and exit of one VM.
pub struct Lifecycle {
    state: StateCell,
    /// Ticks on every state change, for waiters (see [`Lifecycle::start_settled`]).
    changed: watch::Sender<VmState>,
    events: broadcast::Sender<VmEvent>,
    /// `true` once a stop began; a start or operation in flight ends early.
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
    /// What runs once when the VM ends (or the lifecycle is dropped before).
    hooks: Mutex<Vec<Hook>>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("state", &self.state())
            .field("exit", &self.exit())
            .finish_non_exhaustive()
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

/// Proof that its holder runs the VM's one stop. Dropped without the VM ending (the
/// stopping caller's future was dropped), it hands the exit back (see
/// [`Lifecycle::stop_owns_exit`]).
#[derive(Debug)]
pub struct StopGuard<'a> {
    life: &'a Lifecycle,
}

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.life.stopping.store(false, Ordering::Release);
    }
}

/// A start under way (`Starting`). [`StartAttempt::running`] finishes it; dropped
/// before, the start was abandoned (its future dropped): the VM ends as a failed start
/// ([`Lifecycle::end_now`]), its cleanup hooks run, nothing is left.
#[derive(Debug)]
#[must_use = "dropping the attempt ends the VM as a cancelled start"]
pub struct StartAttempt<'a> {
    life: &'a Lifecycle,
    op: &'static str,
    done: bool,
}

impl StartAttempt<'_> {
    /// `Starting → Running`: the start succeeded.
    ///
    /// # Errors
    /// `InvalidState` when the VM is no longer `Starting` (a stop or a crash ended it
    /// meanwhile): the start fails with that.
    pub fn running(mut self) -> Result<()> {
        self.done = true;
        self.life
            .transition(self.op, VmState::Starting, VmState::Running)
    }

    /// The start failed and the backend ends the VM itself (with [`Lifecycle::end`]):
    /// the attempt's drop then has nothing to do.
    pub fn failed(mut self) {
        self.done = true;
    }
}

impl Drop for StartAttempt<'_> {
    fn drop(&mut self) {
        if !self.done && self.life.exit().is_none() {
            tracing::warn!("start abandoned (its future was dropped): ending the VM");
            self.life
                .end_now(ExitInfo::new(ExitReason::StartFailed).with_message(format!(
                    "{}: cancelled: the caller dropped the start before it finished",
                    self.op
                )));
        }
    }
}

impl Lifecycle {
    /// A VM in `New`, with its own event channel.
    pub fn new() -> Self {
        Lifecycle::with_events(broadcast::channel(EVENTS).0)
    }

    /// A VM in `New`, publishing on `events`.
    pub fn with_events(events: broadcast::Sender<VmEvent>) -> Self {
        Lifecycle {
            state: StateCell::new(),
            changed: watch::channel(VmState::New).0,
            events,
            cancel: watch::channel(false).0,
            stopping: AtomicBool::new(false),
            exit: watch::channel(None).0,
            ending: tokio::sync::Mutex::new(()),
            run_changes: tokio::sync::Mutex::new(()),
            hooks: Mutex::new(Vec::new()),
        }
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.state.get()
    }

    /// Fails with `InvalidState` for `op` unless the state is one of `allowed`.
    ///
    /// # Errors
    /// `InvalidState` naming `op` and the state found.
    pub fn require(&self, op: &'static str, allowed: &[VmState]) -> Result<()> {
        self.state.require(op, allowed).map(drop)
    }

    /// The contract's answer for an operation the backend does not offer: the wrong
    /// state first (as every backend answers it), else `Unsupported` with `reason`.
    pub fn unsupported(
        &self,
        op: &'static str,
        backend: &str,
        allowed: &[VmState],
        reason: &str,
    ) -> Error {
        match self.require(op, allowed) {
            Err(wrong_state) => wrong_state,
            Ok(()) => Error::unsupported(op, backend, reason),
        }
    }

    /// A checked `from → to` for `op`, published as [`VmEvent::StateChanged`].
    ///
    /// # Errors
    /// `InvalidState` when the state is not `from` or the table forbids the move.
    pub fn transition(&self, op: &'static str, from: VmState, to: VmState) -> Result<()> {
        self.state.transition(op, from, to)?;
        self.published(from, to);
        Ok(())
    }

    fn published(&self, from: VmState, to: VmState) {
        self.changed.send_replace(to);
        let _ = self.events.send(VmEvent::StateChanged { from, to });
    }

    /// Publishes `event` (a subscriber that fell behind sees `Lagged`; nobody blocks).
    pub fn publish(&self, event: VmEvent) {
        let _ = self.events.send(event);
    }

    /// A new subscription to the events.
    pub fn events(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// Makes the run state what the VMM reports (`running`: its vCPUs run): `Running
    /// ↔ Paused` only; any other state is left alone. Returns whether it changed.
    pub fn follow_vmm(&self, running: bool) -> bool {
        let (from, to) = if running {
            (VmState::Paused, VmState::Running)
        } else {
            (VmState::Running, VmState::Paused)
        };
        // Not `from` (already there, starting, or gone): nothing to follow.
        self.transition("follow the VMM's run state", from, to)
            .is_ok()
    }

    /// `New → Starting` for `op`: the start under way, which its drop ends unless it
    /// finished (see [`StartAttempt`]).
    ///
    /// # Errors
    /// `InvalidState` outside `New`.
    pub fn begin_start(&self, op: &'static str) -> Result<StartAttempt<'_>> {
        self.transition(op, VmState::New, VmState::Starting)?;
        Ok(StartAttempt {
            life: self,
            op,
            done: false,
        })
    }

    /// Registers `hook` to run exactly once when the VM ends ([`Lifecycle::end`],
    /// [`Lifecycle::end_now`], an abandoned start) or, if it never does, when the
    /// lifecycle is dropped. Registered after the end, it runs at once.
    pub fn on_end(&self, hook: impl FnOnce() + Send + 'static) {
        if self.exit().is_some() {
            hook();
            return;
        }
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(hook));
    }

    fn run_hooks(&self) {
        let hooks = std::mem::take(&mut *self.hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for hook in hooks {
            // One hook's panic must not keep the others from running.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)).is_err() {
                tracing::error!("a cleanup hook panicked");
            }
        }
    }

    /// Begins the VM's one stop: the first caller gets the guard (and every start or
    /// operation in flight is told to end, see [`Lifecycle::cancelled`]); `None` for
    /// later callers, who wait for the exit instead.
    pub fn begin_stop(&self) -> Option<StopGuard<'_>> {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.cancel.send_replace(true);
        Some(StopGuard { life: self })
    }

    /// Whether a stop is under way and the VM has not ended yet.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire) && self.exit.borrow().is_none()
    }

    /// Whether the exit is the stopping caller's to report (a stop guard is alive).
    pub fn stop_owns_exit(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// How a backend's `shutdown` begins. `Err(exit)` when the answer is known
    /// without stopping anything: the VM had ended; another caller's stop is under way
    /// (its exit, awaited); the VM was never started (ended now as `NeverStarted`, its
    /// hooks run); a start under way, told by this stop to end, ended it (awaited).
    /// `Ok(guard)`: the VM runs or is paused, and this caller stops it and ends it with
    /// [`Lifecycle::end`].
    pub async fn begin_shutdown(&self) -> std::result::Result<StopGuard<'_>, ExitInfo> {
        if let Some(info) = self.exit() {
            return Err(info);
        }
        let Some(stop) = self.begin_stop() else {
            return Err(self.wait_exit().await);
        };
        // New → Shutdown as one compare-and-swap, so a racing `start` cannot slip in.
        if self
            .transition("shutdown", VmState::New, VmState::Shutdown)
            .is_ok()
        {
            return Err(self.end(ExitInfo::never_started(), async {}).await);
        }
        if self.start_settled().await == VmState::Shutdown {
            return Err(self.wait_exit().await);
        }
        Ok(stop)
    }

    /// A backend's `pause`: `Running` required, `work` (stopping the vCPUs) run with no
    /// other pause or resume at once, then `Running → Paused` and [`VmEvent::Stopped`].
    ///
    /// # Errors
    /// `InvalidState` outside `Running` (before `work`), or `work`'s error.
    pub async fn pause(&self, work: impl std::future::Future<Output = Result<()>>) -> Result<()> {
        self.change_run("pause", VmState::Running, VmState::Paused, work)
            .await?;
        self.publish(VmEvent::Stopped);
        Ok(())
    }

    /// A backend's `resume`: as [`Lifecycle::pause`], `Paused → Running` and
    /// [`VmEvent::Resumed`].
    ///
    /// # Errors
    /// `InvalidState` outside `Paused` (before `work`), or `work`'s error.
    pub async fn resume(&self, work: impl std::future::Future<Output = Result<()>>) -> Result<()> {
        self.change_run("resume", VmState::Paused, VmState::Running, work)
            .await?;
        self.publish(VmEvent::Resumed);
        Ok(())
    }

    async fn change_run(
        &self,
        op: &'static str,
        from: VmState,
        to: VmState,
        work: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let _one = self.one_run_change().await;
        self.require(op, &[from])?;
        work.await?;
        self.transition(op, from, to)
    }

    /// Resolves once a stop has begun.
    pub fn cancelled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.cancel.subscribe();
        async move {
            // The sender lives as long as the lifecycle; a closed channel means it is
            // gone, which is a stop too.
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Waits until the state is no longer `Starting` (a cancelled start has finished
    /// releasing, or it won the race and the VM runs). Returns the state then.
    pub async fn start_settled(&self) -> VmState {
        // `changed` only wakes the waiter; the cell is the truth (two changes racing
        // may publish out of order).
        let mut rx = self.changed.subscribe();
        let _ = rx.wait_for(|_| self.state() != VmState::Starting).await;
        self.state()
    }

    /// The exit, once the VM is gone.
    pub fn exit(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Waits until the VM is gone.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(info) => info.clone().unwrap_or_else(ExitInfo::never_started),
            // The sender lives in `self`, which we borrow.
            Err(_) => ExitInfo::never_started(),
        }
    }

    /// One pause or resume at a time: the returned guard is held while it runs.
    pub async fn one_run_change(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.run_changes.lock().await
    }

    /// Ends the VM's life: awaits `release` (what the backend took), runs the cleanup
    /// hooks, moves to `Shutdown` and publishes `info` as [`VmEvent::Exited`]. The first
    /// call wins; a later call waits for it, drops its `release` unawaited, and gets the
    /// exit in force.
    pub async fn end(
        &self,
        info: ExitInfo,
        release: impl std::future::Future<Output = ()>,
    ) -> ExitInfo {
        let _ending = self.ending.lock().await;
        if let Some(first) = self.exit() {
            return first;
        }
        release.await;
        self.finish(info)
    }

    /// [`Lifecycle::end`] without awaiting anything (for a `Drop`): the cleanup hooks
    /// release what the backend took. When an `end` is under way, that one finishes
    /// the VM and this returns what is known (its exit, or `info`).
    pub fn end_now(&self, info: ExitInfo) -> ExitInfo {
        let Ok(_ending) = self.ending.try_lock() else {
            return self.exit().unwrap_or(info);
        };
        if let Some(first) = self.exit() {
            return first;
        }
        self.finish(info)
    }

    fn finish(&self, info: ExitInfo) -> ExitInfo {
        self.run_hooks();
        if let Ok(from) = self
            .state
            .transition_from_any("shutdown", VmState::Shutdown)
        {
            self.published(from, VmState::Shutdown);
        }
        let _ = self.events.send(VmEvent::Exited(info.clone()));
        self.exit.send_replace(Some(info.clone()));
        info
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        // A VM dropped alive: what it holds goes now.
        self.run_hooks();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn host_shutdown() -> ExitInfo {
        ExitInfo {
            reason: ExitReason::HostShutdown,
            ..ExitInfo::never_started()
        }
    }

    /// The events published so far.
    fn drain(events: &mut broadcast::Receiver<VmEvent>) -> Vec<VmEvent> {
        std::iter::from_fn(|| events.try_recv().ok()).collect()
    }

    fn counted(life: &Lifecycle) -> Arc<AtomicUsize> {
        let runs = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&runs);
        life.on_end(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        runs
    }

    #[tokio::test]
    async fn one_stop_and_the_first_exit_wins() {
        let life = Lifecycle::new();
        let hooks = counted(&life);
        let guard = life.begin_stop().expect("the first stop");
        assert!(life.begin_stop().is_none(), "a second stop waits instead");
        assert!(life.is_stopping());
        assert_eq!(
            life.end(host_shutdown(), async {}).await.reason,
            ExitReason::HostShutdown
        );
        let again = life.end(ExitInfo::never_started(), async {
            panic!("a later end releases nothing")
        });
        assert_eq!(again.await.reason, ExitReason::HostShutdown);
        assert_eq!(
            life.end_now(ExitInfo::never_started()).reason,
            ExitReason::HostShutdown
        );
        assert!(!life.is_stopping(), "ended");
        assert_eq!(life.state(), VmState::Shutdown);
        drop(guard);
        assert_eq!(life.wait_exit().await.reason, ExitReason::HostShutdown);
        drop(life);
        assert_eq!(hooks.load(Ordering::SeqCst), 1, "the hooks ran once");
    }

    #[tokio::test]
    async fn a_dropped_guard_hands_the_exit_back() {
        let life = Lifecycle::new();
        let guard = life.begin_stop().unwrap();
        assert!(life.stop_owns_exit());
        drop(guard);
        assert!(!life.stop_owns_exit());
        // The cancel stays: a start or operation in flight was told to end.
        tokio::time::timeout(std::time::Duration::from_secs(1), life.cancelled())
            .await
            .expect("cancelled stays set");
    }

    #[tokio::test]
    async fn a_stop_awaits_the_start_without_polling() {
        let life = Lifecycle::new();
        let mut events = life.events();
        let attempt = life.begin_start("start").unwrap();
        let settled = life.start_settled();
        tokio::pin!(settled);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), &mut settled)
                .await
                .is_err(),
            "still starting"
        );
        attempt.running().unwrap();
        assert_eq!(settled.await, VmState::Running);
        assert!(life.follow_vmm(false));
        assert!(!life.follow_vmm(false), "already paused");
        let mut seen = Vec::new();
        while let Ok(VmEvent::StateChanged { to, .. }) = events.try_recv() {
            seen.push(to);
        }
        assert_eq!(seen, [VmState::Starting, VmState::Running, VmState::Paused]);
    }

    #[tokio::test]
    async fn an_abandoned_start_ends_the_vm_and_runs_its_hooks_once() {
        let life = Lifecycle::new();
        let mut events = life.events();
        let hooks = counted(&life);
        let start = async {
            let _attempt = life.begin_start("start").unwrap();
            std::future::pending::<()>().await;
        };
        // The caller gives up on the start: its future is dropped.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), start)
                .await
                .is_err()
        );
        assert_eq!(life.state(), VmState::Shutdown);
        assert_eq!(hooks.load(Ordering::SeqCst), 1);
        let exit = life.exit().expect("ended");
        assert_eq!(exit.reason, ExitReason::StartFailed);
        assert!(
            exit.message
                .as_deref()
                .is_some_and(|m| m.contains("start: cancelled")),
            "{exit:?}"
        );
        assert_eq!(
            drain(&mut events),
            [
                VmEvent::StateChanged {
                    from: VmState::New,
                    to: VmState::Starting
                },
                VmEvent::StateChanged {
                    from: VmState::Starting,
                    to: VmState::Shutdown
                },
                VmEvent::Exited(exit),
            ]
        );
        drop(life);
        assert_eq!(hooks.load(Ordering::SeqCst), 1, "not again on drop");
    }

    #[test]
    fn a_vm_dropped_alive_runs_its_hooks_and_a_late_hook_runs_at_once() {
        let life = Lifecycle::new();
        let hooks = counted(&life);
        drop(life);
        assert_eq!(hooks.load(Ordering::SeqCst), 1);
        let ended = Lifecycle::new();
        ended.end_now(ExitInfo::never_started());
        let late = counted(&ended);
        assert_eq!(late.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn what_a_backend_lacks_is_the_wrong_state_first_then_unsupported() {
        let life = Lifecycle::new();
        let err = life.unsupported("hotplug_disk", "null", &[VmState::Running], "no devices");
        assert!(
            matches!(
                err,
                Error::InvalidState {
                    state: VmState::New,
                    ..
                }
            ),
            "{err:?}"
        );
        let attempt = life.begin_start("start").unwrap();
        attempt.running().unwrap();
        let err = life.unsupported("hotplug_disk", "null", &[VmState::Running], "no devices");
        assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn pause_and_resume_check_first_and_publish_after() {
        let life = Lifecycle::new();
        let work_ran = std::sync::atomic::AtomicBool::new(false);
        let err = life
            .pause(async {
                work_ran.store(true, Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidState { .. }), "{err:?}");
        assert!(
            !work_ran.load(Ordering::SeqCst),
            "no work in the wrong state"
        );
        life.begin_start("start").unwrap().running().unwrap();
        let mut events = life.events();
        let refused = life.pause(async { Err(Error::config("x", "the VMM said no")) });
        assert!(refused.await.is_err());
        assert_eq!(
            life.state(),
            VmState::Running,
            "a failed pause changes nothing"
        );
        life.pause(async { Ok(()) }).await.unwrap();
        life.resume(async { Ok(()) }).await.unwrap();
        assert_eq!(
            drain(&mut events),
            [
                VmEvent::StateChanged {
                    from: VmState::Running,
                    to: VmState::Paused
                },
                VmEvent::Stopped,
                VmEvent::StateChanged {
                    from: VmState::Paused,
                    to: VmState::Running
                },
                VmEvent::Resumed,
            ]
        );
    }

    #[tokio::test]
    async fn begin_shutdown_knows_the_answer_or_hands_over_the_stop() {
        let fresh = Lifecycle::new();
        let hooks = counted(&fresh);
        let exit = fresh.begin_shutdown().await.unwrap_err();
        assert_eq!(exit.reason, ExitReason::NeverStarted);
        assert_eq!(fresh.state(), VmState::Shutdown);
        assert_eq!(hooks.load(Ordering::SeqCst), 1);
        assert_eq!(fresh.begin_shutdown().await.unwrap_err(), exit, "ended");

        let life = Lifecycle::new();
        life.begin_start("start").unwrap().running().unwrap();
        let stop = life
            .begin_shutdown()
            .await
            .expect("a running VM is this caller's to stop");
        let second = life.begin_shutdown();
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), &mut second)
                .await
                .is_err(),
            "a second caller waits for the first stop"
        );
        life.end(host_shutdown(), async {}).await;
        drop(stop);
        assert_eq!(second.await.unwrap_err().reason, ExitReason::HostShutdown);
    }
}
