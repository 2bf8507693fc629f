//! The two tasks that watch a VM's QEMU while it lives: the process monitor (an exit
//! nobody asked for ends the VM) and the QMP event pump (QEMU's events reach the VM's
//! event stream and drive the run state). Both hold the VM weakly, so dropping the
//! instance is never held up by them.

use std::sync::{Arc, Weak};

use tokio::sync::broadcast;
use vmkit_core::{VmEvent, VmState};
use vmkit_qmp::QmpClient;

use crate::events::{closed_serial_port, to_vm_event};
use crate::guest::LINK_SETTLE;
use crate::process::Process;
use crate::vm::Vm;

/// Watches the process: when it exits while no `start` or `shutdown` is handling it
/// (a crash, or a guest that powered off by itself), ends the VM's life.
pub(crate) fn spawn_monitor(vm: &Arc<Vm>, process: Arc<Process>) {
    let weak: Weak<Vm> = Arc::downgrade(vm);
    tokio::spawn(async move {
        let exit = process.wait().await;
        let Some(vm) = weak.upgrade() else { return };
        let handled_elsewhere =
            vm.life().stop_owns_exit() || vm.life().state() == VmState::Starting;
        if !handled_elsewhere {
            let info = vm.unrequested_exit(exit).await;
            vm.end(info).await;
        }
    });
}

/// Pumps QMP events into the VM's event stream and remembers what the exit report
/// needs. Ends with the QMP connection.
pub(crate) fn spawn_event_pump(vm: &Arc<Vm>, qmp: &QmpClient) {
    let weak: Weak<Vm> = Arc::downgrade(vm);
    let mut rx = qmp.events();
    tokio::spawn(async move {
        loop {
            let event = match rx.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "QMP events dropped (slow event pump)");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Some(vm_event) = to_vm_event(&event) else {
                return;
            };
            let Some(vm) = weak.upgrade() else { return };
            if let Some(port) = closed_serial_port(&event) {
                vm.with_running(|r| r.link().map(|link| link.guest_port_closed(port)));
            }
            vm.note(&vm_event);
            match &vm_event {
                VmEvent::Stopped => vm.follow_qemu(false),
                VmEvent::Resumed => {
                    vm.follow_qemu(true);
                    open_link_later(&vm);
                }
                _ => {}
            }
            vm.publish(vm_event);
        }
    });
}

/// QEMU announces RESUME before it restarts the vsock device's vrings: the link opens
/// a little later (a resume of vmkit's opens it itself; this covers a `cont` from
/// someone else).
fn open_link_later(vm: &Arc<Vm>) {
    let weak = Arc::downgrade(vm);
    tokio::spawn(async move {
        tokio::time::sleep(LINK_SETTLE).await;
        if let Some(vm) = weak.upgrade()
            && vm.life().state() == VmState::Running
        {
            vm.open_link(true);
        }
    });
}
