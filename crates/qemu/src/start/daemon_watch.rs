//! Watching the hybrid-vsock daemon while a start waits for the agent.
//!
//! About one VM in a hundred, vhost-device-vsock 0.3 drops every host dial unread for a
//! whole start although QEMU reports the guest's vsock device started: the daemon
//! serving the host's socket has no guest memory table (docs/guest-communication.md).
//! The guest is fine; only the daemon is lost. The watch tells that apart from a guest
//! still booting — QEMU says the device's vhost backend runs, and a probe dial is still
//! dropped unread for [`LOST_AFTER`] — and the start then replaces the device and its
//! daemon ([`crate::relink::repair`]) instead of waiting out its deadline.

use std::path::Path;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use vmkit_vsock::{HybridProbe, probe_hybrid};

use crate::qmp::Qmp;
use crate::relink::vsock_started;
use crate::vm::Vm;

/// How often the watch looks.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// How long dials must be dropped unread with the device started before the daemon
/// counts as lost. QEMU marks the device started without waiting for the daemon to take
/// the memory table, so a dial right after may still be dropped: that lasts
/// milliseconds, not seconds.
const LOST_AFTER: Duration = Duration::from_millis(1500);
/// The bound of one probe dial.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether a probe's outcome and QEMU's view of the device say the daemon is lost.
#[derive(Debug, Default)]
pub(super) struct LostDaemon {
    since: Option<Instant>,
}

impl LostDaemon {
    /// Takes one look (`started`: QEMU reports the device's vhost backend running;
    /// `probe`: what a dial met) at `now`; true once the daemon has dropped dials unread
    /// with the device started for [`LOST_AFTER`], without a look in between that said
    /// otherwise.
    pub(super) fn look(&mut self, started: bool, probe: HybridProbe, now: Instant) -> bool {
        if !started || probe != HybridProbe::Unread {
            self.since = None;
            return false;
        }
        now.duration_since(*self.since.get_or_insert(now)) >= LOST_AFTER
    }
}

/// Returns once `vm`'s hybrid-vsock daemon (host socket `uds`, guest `port`) is lost
/// (see [`LostDaemon`]); pends for ever without QMP, so that a caller racing it against
/// the agent's answer is left with the answer.
pub(super) async fn daemon_lost(vm: &Vm, uds: &Path, port: u32) {
    let Ok(client) = vm.qmp("start") else {
        return std::future::pending().await;
    };
    let qmp = Qmp::new(client);
    let mut lost = LostDaemon::default();
    loop {
        sleep(LOOK_EVERY).await;
        let started = vsock_started(&qmp).await.unwrap_or(false);
        let probe = if started {
            probe_hybrid(uds, port, PROBE_TIMEOUT).await
        } else {
            HybridProbe::Other
        };
        tracing::trace!(vm = %vm.id(), started, ?probe, "vsock daemon watch");
        if lost.look(started, probe, Instant::now()) {
            return;
        }
    }
}

/// What QEMU says of the hybrid-vsock device, for a start that timed out waiting for
/// the agent: whether the guest's driver started it (so the daemon should have the
/// guest's memory) or not (the guest never set the device up). Empty when there is no
/// such device or QEMU does not answer within [`PROBE_TIMEOUT`] (the start's deadline
/// has passed: this must not hold it up).
pub(super) async fn device_state(vm: &Vm) -> String {
    let Ok(client) = vm.qmp("start") else {
        return String::new();
    };
    let qmp = Qmp::new(client);
    match tokio::time::timeout(PROBE_TIMEOUT, vsock_started(&qmp)).await {
        Ok(Ok(true)) => "; QEMU reports the guest's vsock device started".to_owned(),
        Ok(Ok(false)) => {
            "; QEMU reports the guest's vsock device not started (the guest's driver never \
             set it up)"
                .to_owned()
        }
        Ok(Err(_)) | Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dials_dropped_unread_with_the_device_started_for_a_while_count() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut lost = LostDaemon::default();
        // A guest still booting: the device not started, dials dropped.
        assert!(!lost.look(false, HybridProbe::Other, at(0)));
        assert!(!lost.look(false, HybridProbe::Other, at(5000)));
        // Started, dropped: counted from here.
        assert!(!lost.look(true, HybridProbe::Unread, at(5500)));
        assert!(!lost.look(true, HybridProbe::Unread, at(6500)));
        assert!(lost.look(true, HybridProbe::Unread, at(7000)));

        // The daemon read a dial in between (nothing listening yet): counting restarts.
        let mut lost = LostDaemon::default();
        assert!(!lost.look(true, HybridProbe::Unread, at(0)));
        assert!(!lost.look(true, HybridProbe::NotListening, at(1000)));
        assert!(!lost.look(true, HybridProbe::Unread, at(1500)));
        assert!(!lost.look(true, HybridProbe::Unread, at(2500)));
        assert!(lost.look(true, HybridProbe::Unread, at(3000)));

        // The device stopped again (the guest reset it): counting restarts too.
        let mut lost = LostDaemon::default();
        assert!(!lost.look(true, HybridProbe::Unread, at(0)));
        assert!(!lost.look(false, HybridProbe::Unread, at(1000)));
        assert!(!lost.look(true, HybridProbe::Unread, at(2000)));
        assert!(!lost.look(true, HybridProbe::Answered, at(4000)));
    }
}
