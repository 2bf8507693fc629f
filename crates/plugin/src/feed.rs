//! [`InstanceFeed`]: where one plugin instance's events arrive on the host. It keeps
//! what they say — the state, and the exit once there is one — so that
//! `PluginInstance::state()` is the truth without asking the plugin, and it ends the
//! instance exactly once: with the backend's own `Exited`, or, when the plugin goes away
//! first, with a crash naming the cause.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};
use vmkit_core::{ExitInfo, ExitReason, VmEvent, VmState};

/// One instance's events, state and exit, as the plugin reported them.
#[derive(Debug)]
pub struct InstanceFeed {
    backend: String,
    events: broadcast::Sender<VmEvent>,
    /// The state the events said last; also the lock that keeps publishing in order.
    state: Mutex<VmState>,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl InstanceFeed {
    /// A feed for a new instance of `backend` (in `New`).
    pub fn new(backend: &str) -> InstanceFeed {
        InstanceFeed {
            backend: backend.to_owned(),
            events: broadcast::channel(256).0,
            state: Mutex::new(VmState::New),
            exit: watch::channel(None).0,
        }
    }

    fn locked(&self) -> MutexGuard<'_, VmState> {
        // Every critical section is one assignment and a send: never half done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An event from the plugin: its state change or exit is recorded, and it is
    /// published. After the instance ended nothing more is (a backend's late events
    /// after its plugin was declared gone, a second `Exited`).
    pub fn publish(&self, event: VmEvent) {
        let mut state = self.locked();
        if self.exit.borrow().is_some() {
            return;
        }
        match &event {
            VmEvent::StateChanged { to, .. } => *state = *to,
            VmEvent::Exited(info) => {
                *state = VmState::Shutdown;
                self.exit.send_replace(Some(info.clone()));
            }
            _ => {}
        }
        let _ = self.events.send(event);
    }

    /// The plugin went away (`cause`): the instance ends now as crashed, with
    /// `StateChanged` to `Shutdown` and `Exited` published once. Returns its exit
    /// (the first one, when it had already ended).
    pub fn lost(&self, cause: &str) -> ExitInfo {
        let mut state = self.locked();
        if let Some(exit) = self.exit.borrow().clone() {
            return exit;
        }
        let from = std::mem::replace(&mut *state, VmState::Shutdown);
        if from != VmState::Shutdown {
            let _ = self.events.send(VmEvent::StateChanged {
                from,
                to: VmState::Shutdown,
            });
        }
        let exit = ExitInfo {
            reason: ExitReason::Crashed,
            stage: None,
            exit_code: None,
            signal: None,
            message: Some(format!("the {} backend is gone: {cause}", self.backend)),
        };
        let _ = self.events.send(VmEvent::Exited(exit.clone()));
        self.exit.send_replace(Some(exit.clone()));
        exit
    }

    /// A reply said how the instance ended (`shutdown`, `wait`): recorded when no
    /// event said it first (events come before their operation's reply).
    pub(crate) fn ended(&self, exit: &ExitInfo) {
        let mut state = self.locked();
        if self.exit.borrow().is_none() {
            *state = VmState::Shutdown;
            self.exit.send_replace(Some(exit.clone()));
        }
    }

    /// The state the plugin last reported.
    pub fn state(&self) -> VmState {
        *self.locked()
    }

    /// How the instance ended, once it has.
    pub fn exit(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Resolves with the exit once the instance has ended.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone().unwrap_or_else(ExitInfo::never_started),
            // The sender lives in `self`, which we borrow.
            Err(_) => ExitInfo::never_started(),
        }
    }

    /// A new subscription to the events.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(reason: ExitReason) -> VmEvent {
        VmEvent::Exited(ExitInfo {
            reason,
            stage: None,
            exit_code: None,
            signal: None,
            message: None,
        })
    }

    #[test]
    fn the_state_follows_the_events_and_the_first_exit_wins() {
        let feed = InstanceFeed::new("null");
        let mut rx = feed.subscribe();
        feed.publish(VmEvent::StateChanged {
            from: VmState::New,
            to: VmState::Starting,
        });
        feed.publish(VmEvent::StateChanged {
            from: VmState::Starting,
            to: VmState::Running,
        });
        assert_eq!(feed.state(), VmState::Running);
        feed.publish(exited(ExitReason::HostShutdown));
        assert_eq!(feed.state(), VmState::Shutdown);
        // Gone afterwards: the first exit stays, and nothing more is published.
        let lost = feed.lost("the backend process exited with code 1");
        assert_eq!(lost.reason, ExitReason::HostShutdown);
        feed.publish(exited(ExitReason::Crashed));
        assert_eq!(feed.exit().unwrap().reason, ExitReason::HostShutdown);
        let mut seen = Vec::new();
        while let Ok(event) = rx.try_recv() {
            seen.push(event);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[tokio::test]
    async fn a_lost_plugin_ends_its_instance_once_as_crashed() {
        let feed = InstanceFeed::new("qemu");
        let mut rx = feed.subscribe();
        feed.publish(VmEvent::StateChanged {
            from: VmState::Paused,
            to: VmState::Running,
        });
        let waiter = feed.wait_exit();
        let first = feed.lost("the backend process was killed by signal 9");
        let second = feed.lost("again");
        assert_eq!(first, second);
        assert_eq!(first.reason, ExitReason::Crashed);
        assert_eq!(
            first.message.as_deref(),
            Some("the qemu backend is gone: the backend process was killed by signal 9")
        );
        assert_eq!(waiter.await, first);
        let _ = rx.try_recv(); // Paused → Running
        assert_eq!(
            rx.try_recv().unwrap(),
            VmEvent::StateChanged {
                from: VmState::Running,
                to: VmState::Shutdown
            }
        );
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Exited(first));
        assert!(rx.try_recv().is_err(), "Exited once");
    }
}
