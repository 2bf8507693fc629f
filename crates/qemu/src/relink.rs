//! Repairing a hybrid-vsock link whose daemon stopped serving the guest.
//!
//! vhost-device-vsock 0.3 can end its vring worker and leave the process running (see
//! [`vmkit_vsock::LinkGate`]); the guest is fine but unreachable. QEMU cannot reconnect
//! a `vhost-user-vsock-pci` to a new daemon (with `reconnect-ms` its device fails to
//! realize), so the device is replaced: `device_del` (it sits on a root port of its own,
//! [`crate::command::VSOCK_PORT_ID`]), the old daemon killed, its chardev removed, a new
//! daemon spawned on the same sockets, the chardev and the device added again. The
//! guest's driver probes the new device and the agent's listeners survive: measured
//! here, about 170 ms from `device_del` to an answered `Ping`. The host's traffic stays
//! held (`Vm::open_link`) until QEMU has started the new device.

use std::time::Duration;

use tokio::time::{Instant, sleep, timeout_at};
use vmkit_core::VmEvent;
use vmkit_vsock::GuestAddr;

use crate::command::{VSOCK_ID, vhost_user_vsock_device};
use crate::error::Error;
use crate::qmp::{Device, Qmp};
use crate::vm::Vm;

/// How often QEMU is asked whether the new device has started.
const STARTED_POLL: Duration = Duration::from_millis(10);

fn failed(step: &'static str) -> impl Fn(String) -> Error {
    move |cause| Error::Relink { step, cause }
}

/// Replaces the VM's hybrid-vsock device and daemon, within `timeouts.hotplug`. The
/// link's gate is closed on return, whatever the outcome; the caller opens it.
///
/// # Errors
/// [`Error::Relink`] naming the step that failed: the VM has no replaceable device
/// (kernel vsock, microvm), the guest did not release the old device, the new daemon
/// did not come up, or QEMU refused a command.
pub(crate) async fn repair(vm: &Vm) -> Result<(), Error> {
    let check = failed("check");
    let machine = vm.options().machine;
    if !machine.has_pci() {
        return Err(check(format!(
            "{}'s vsock device sits on no hot-plug port",
            machine.as_str()
        )));
    }
    let uds = match vm.link_info() {
        Some((_, GuestAddr::HybridVsock { uds, .. })) => uds,
        _ => {
            return Err(check(
                "only a hybrid-vsock link has a daemon to replace".into(),
            ));
        }
    };
    let qmp = Qmp::new(vm.qmp("relink").map_err(|_| check("QMP is gone".into()))?);
    vm.open_link(false);
    let deadline = Instant::now() + vm.config().timeouts.hotplug;
    let mut events = vm.subscribe();
    qmp.device_del(VSOCK_ID)
        .await
        .map_err(|e| failed("device_del")(e.to_string()))?;
    let released = timeout_at(deadline, async {
        loop {
            match events.recv().await {
                Ok(VmEvent::DeviceDeleted { id: Some(id), .. }) if id == VSOCK_ID => return true,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            }
        }
    })
    .await;
    if released != Ok(true) {
        return Err(failed("device_del")(
            "the guest did not release the old device".into(),
        ));
    }
    let old = vm.with_link(|l| l.take_daemon()).flatten();
    if let Some(old) = old {
        old.signal(libc::SIGKILL);
    }
    qmp.chardev_remove(VSOCK_ID)
        .await
        .map_err(|e| failed("chardev-remove")(e.to_string()))?;
    let (daemon, identity) = timeout_at(
        deadline,
        crate::guest::spawn_daemon(vm.config(), vm.options(), &uds),
    )
    .await
    .map_err(|_| failed("spawn vhost-device-vsock")("it did not come up in time".into()))?
    .map_err(|e| failed("spawn vhost-device-vsock")(e.to_string()))?;
    let vhost = vm.config().layout().vhost_user_vsock_socket();
    vm.with_link(|link| link.put_daemon(daemon, identity));
    qmp.add_unix_chardev(VSOCK_ID, &vhost)
        .await
        .map_err(|e| failed("chardev-add")(e.to_string()))?;
    qmp.device_add(Device::from_json(vhost_user_vsock_device()))
        .await
        .map_err(|e| failed("device_add")(e.to_string()))?;
    wait_started(&qmp, deadline).await
}

/// Waits until QEMU reports the new device's vhost backend started (the guest's
/// driver probed it and set it up): before that, a host connection would reach a
/// daemon that has no vrings yet.
async fn wait_started(qmp: &Qmp, deadline: Instant) -> Result<(), Error> {
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match vsock_started(qmp).await {
            Ok(true) => return Ok(()),
            Ok(false) => last = "vhost-started false".to_owned(),
            Err(e) => last = e.to_string(),
        }
        sleep(STARTED_POLL).await;
    }
    Err(failed("wait for the guest to start the new device")(last))
}

/// Whether QEMU reports the hybrid-vsock device's vhost backend started (the guest's
/// driver set the device up), by its virtio backend's QOM path.
pub(crate) async fn vsock_started(qmp: &Qmp) -> Result<bool, vmkit_qmp::Error> {
    qmp.vhost_started(&format!("/machine/peripheral/{VSOCK_ID}/virtio-backend"))
        .await
}
