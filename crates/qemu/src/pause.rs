//! `pause` and `resume`: the run state follows what QEMU reports, never what vmkit asked
//! for. QEMU announces each change with a STOP or RESUME event, which the event pump
//! applies (`Vm::follow_qemu`); `stop`/`cont` here only ask for the change and
//! then wait for that event. When the command fails or times out (a stalled QEMU still
//! queues it and may carry it out later), vmkit asks `query-status` and takes QEMU's
//! answer; if QEMU cannot answer either, the state stays as it is until QEMU's event
//! arrives. So nothing is rolled back that QEMU did, and subscribers see only changes
//! that happened.

use std::time::Duration;

use tokio::sync::broadcast;
use vmkit_core::{Error as CoreError, VmEvent, VmState};
use vmkit_qmp::{QmpClient, qapi_qmp};

use crate::error::Error;
use crate::guest::LINK_SETTLE;
use crate::vm::Vm;

/// `Running → Paused` (`stop`) or `Paused → Running` (`cont`).
pub(crate) async fn change(vm: &Vm, op: &'static str, to: VmState) -> vmkit_core::Result<()> {
    let from = match to {
        VmState::Paused => VmState::Running,
        _ => VmState::Paused,
    };
    // A shutdown under way owns the VM: a pause or resume racing it fails at once.
    // (Once it has ended, the state table answers: `InvalidState` in `Shutdown`.)
    if vm.life().is_stopping() {
        return Err(CoreError::backend(op, Error::ShuttingDown));
    }
    // One change at a time: a resume waits for a pause in flight to settle.
    let _one = vm.life().one_run_change().await;
    if vm.life().is_stopping() {
        return Err(CoreError::backend(op, Error::ShuttingDown));
    }
    let qmp = vm.qmp(op)?;
    vm.life().require(op, &[from])?;
    let mut states = vm.subscribe();
    let timeout = vm.config().timeouts.command;
    if to == VmState::Paused {
        // Before QEMU stops the vrings: nothing of ours may reach a stopped vsock
        // device. Opened again when QEMU runs (its RESUME, or its answer below).
        vm.open_link(false);
    }
    let (command, sent) = match to {
        VmState::Paused => ("stop", qmp.execute(qapi_qmp::stop {}).await.map(drop)),
        _ => ("cont", qmp.execute(qapi_qmp::cont {}).await.map(drop)),
    };
    match sent {
        Ok(()) => {
            // QEMU sent its event with (before) the reply: the pump applies it.
            if reached(vm, &mut states, to, timeout).await {
                if to == VmState::Running {
                    open_link_when_settled(vm).await;
                }
                return Ok(());
            }
            // No event: QEMU was in that state already, or the event was lost.
            match reconcile(vm, &qmp).await {
                Ok(state) if state == to => {
                    if to == VmState::Running {
                        open_link_when_settled(vm).await;
                    }
                    Ok(())
                }
                Ok(state) => Err(CoreError::backend(
                    format!("{op}: {command}"),
                    Error::RunState {
                        asked: to,
                        reported: state,
                    },
                )),
                Err(e) => Err(CoreError::backend(format!("{op}: query-status"), e)),
            }
        }
        Err(e) => {
            // QEMU may still carry the command out (a stalled QEMU queued it): take
            // what it says now; its event corrects the state later if it does.
            match reconcile(vm, &qmp).await {
                Ok(VmState::Running) => open_link_when_settled(vm).await,
                Ok(_) => {}
                Err(why) => {
                    tracing::warn!(vm = %vm.id(), %why, "{op}: QEMU's run state is unknown until its next STOP/RESUME event");
                }
            }
            Err(CoreError::backend(
                format!("{op}: {command}"),
                Error::from(e),
            ))
        }
    }
}

/// How long the check after a resume may take to reach the agent.
const LINK_CHECK: Duration = Duration::from_secs(2);

/// Opens the guest link once the vsock daemon has had time to restart its vrings, if
/// the VM still runs, and checks it: an agent that does not answer a fresh connection
/// marks the link broken, so that guest calls fail at once with the cause instead of
/// each waiting for its deadline.
async fn open_link_when_settled(vm: &Vm) {
    // Only a hybrid-vsock link is held while paused: kernel vsock has nothing to settle.
    if vm.with_link(|l| l.is_gated()) != Some(true) {
        return;
    }
    tokio::time::sleep(LINK_SETTLE).await;
    if vm.life().state() != VmState::Running {
        return;
    }
    vm.open_link(true);
    let Some((_, addr)) = vm.link_info() else {
        return;
    };
    let deadline = tokio::time::Instant::now() + LINK_CHECK;
    let Err(e) = crate::guest::wait_for_agent(&addr, deadline).await else {
        return;
    };
    tracing::warn!(vm = %vm.id(), %addr, error = %e, "guest link dead after resume; replacing the vsock device");
    let dead = format!("no answer from {addr} after the resume: {e}");
    let repaired = match crate::relink::repair(vm).await {
        Ok(()) => {
            tokio::time::sleep(LINK_SETTLE).await;
            vm.open_link(true);
            let deadline = tokio::time::Instant::now() + LINK_CHECK;
            crate::guest::wait_for_agent(&addr, deadline)
                .await
                .map(drop)
                .map_err(|e| format!("the agent did not answer through the new device: {e}"))
        }
        Err(e) => {
            vm.open_link(true);
            Err(e.to_string())
        }
    };
    match repaired {
        Ok(()) => {
            tracing::info!(vm = %vm.id(), "guest link repaired: new vsock device and daemon")
        }
        Err(why) => {
            tracing::error!(vm = %vm.id(), %why, "guest link could not be repaired");
            vm.break_link(format!("{dead}; replacing the vsock device failed: {why}"));
        }
    }
}

/// Waits up to `timeout` for the state to become `to`.
async fn reached(
    vm: &Vm,
    states: &mut broadcast::Receiver<VmEvent>,
    to: VmState,
    timeout: Duration,
) -> bool {
    let wait = async {
        loop {
            if vm.life().state() == to {
                return true;
            }
            match states.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return false,
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or(false)
}

/// Asks QEMU whether its vCPUs run and makes vmkit's state say the same. Returns the
/// state in force afterwards.
///
/// # Errors
/// `query-status` failed (QEMU stalled or gone): the state is left as it is.
async fn reconcile(vm: &Vm, qmp: &QmpClient) -> Result<VmState, Error> {
    let status = qmp.execute(qapi_qmp::query_status {}).await?;
    vm.follow_qemu(status.running);
    Ok(vm.life().state())
}
