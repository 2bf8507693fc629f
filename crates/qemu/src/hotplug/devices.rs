//! Disk and NIC hot-plug on the reserved PCIe root ports, and `unplug(id)`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, sleep};
use vmkit_core::{DiskConfig, Error as CoreError, NicBackend, NicConfig};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::GuestInfoRequest;

use super::{POLL, agent, agent_err, ctx, qmp_err};
use crate::error::Error;
use crate::instance::Shared;
use vmkit_qmp::QmpClient;

/// A device hot-plugged into this VM.
#[derive(Debug, Clone)]
pub(crate) struct HotDevice {
    /// The device id.
    pub(crate) id: String,
    /// What backs it.
    backend: HotBackend,
    /// The root port it sits on.
    port: String,
}

/// The QEMU backend object of a hot-plugged device, removed after the device.
#[derive(Debug, Clone)]
enum HotBackend {
    /// A disk's block node.
    Block(String),
    /// A NIC's netdev, and the TAP fd vmkit opened for it (closed on unplug, so a TAP
    /// vmkit created goes with it).
    Net {
        netdev: String,
        /// Held for its drop: closing it removes a TAP vmkit created.
        _tap: Option<Arc<std::os::fd::OwnedFd>>,
    },
}

impl HotBackend {
    fn name(&self) -> &str {
        match self {
            HotBackend::Block(n) | HotBackend::Net { netdev: n, .. } => n,
        }
    }

    /// Deletes the backend object in QEMU: `blockdev-del` or `netdev_del`.
    async fn delete(&self, qmp: &QmpClient) -> vmkit_core::Result<()> {
        let (command, args) = match self {
            HotBackend::Block(node) => ("blockdev-del", json!({ "node-name": node })),
            HotBackend::Net { netdev, .. } => ("netdev_del", json!({ "id": netdev })),
        };
        qmp.execute_raw(command, Some(args))
            .await
            .map(drop)
            .map_err(|e| qmp_err(&format!("{command} {}", self.name()), e))
    }
}

/// `device_add`s `device` (a `driver` with id `id` on `port`) over `backend` and records
/// it as hot-plugged. When QEMU refuses, the backend is deleted again and QEMU's words
/// come back in the error.
async fn plug(
    shared: &Shared,
    qmp: &QmpClient,
    driver: &str,
    id: &str,
    port: String,
    device: serde_json::Value,
    backend: HotBackend,
) -> vmkit_core::Result<()> {
    if let Err(e) = qmp.execute_raw("device_add", Some(device)).await {
        if let Err(del) = backend.delete(qmp).await {
            tracing::warn!(backend = backend.name(), error = %del, "deleting the backend after a failed device_add failed");
        }
        return Err(qmp_err(&format!("device_add {driver} {id} on {port}"), e));
    }
    crate::instance::lock(&shared.hot_devices).push(HotDevice {
        id: id.to_owned(),
        backend,
        port,
    });
    Ok(())
}

/// A free reserved root port and a free backend name `<prefix><n>`, or why not.
fn free_port_and_name(
    shared: &Shared,
    op: &str,
    id: &str,
    prefix: &str,
) -> vmkit_core::Result<(String, String)> {
    let hot = crate::instance::lock(&shared.hot_devices);
    if hot.iter().any(|d| d.id == id) {
        return Err(CoreError::bad_argument(
            op,
            "id",
            format!("duplicate device id {id:?} (already hot-plugged)"),
        ));
    }
    let ports = shared.options.hotplug_ports;
    let port = (0..ports)
        .map(|i| format!("{}{i}", crate::command::ROOT_PORT_PREFIX))
        .find(|p| hot.iter().all(|d| &d.port != p))
        .ok_or_else(|| {
            CoreError::exhausted(
                op,
                "hot-plug port",
                format!(
                    "all {ports} hot-plug root ports are in use (backend_options.hotplug_ports)"
                ),
            )
        })?;
    let name = (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|n| hot.iter().all(|d| d.backend.name() != n))
        .unwrap_or_default();
    Ok((port, name))
}

/// Adds `disk` on a free reserved root port and waits until the guest lists it (by
/// serial when it has one, else by a new disk appearing).
pub(crate) async fn add_disk(shared: Arc<Shared>, disk: DiskConfig) -> vmkit_core::Result<()> {
    let op = format!("hotplug_disk {}", disk.id);
    let field = "disk";
    disk.validate(field)?;
    shared.devices().check_free_id(field, &disk.id)?;
    let (port, node) = free_port_and_name(&shared, &op, &disk.id, "vmkit-hot")?;
    let agent = agent(&shared).await.ok();
    // With a serial the new disk is recognised by it; without, by the count going up.
    let disks_before = match (&agent, &disk.serial) {
        (Some(agent), None) => Some(guest_disk_count(agent, &op).await?),
        (Some(_), Some(_)) => Some(0),
        (None, _) => None,
    };
    let (blockdev, mut device) = crate::devices::disk_json(&node, &disk, shared.options.machine);
    device["bus"] = json!(port);
    let qmp = shared.qmp("hotplug_disk")?;
    qmp.execute_raw("blockdev-add", Some(blockdev))
        .await
        .map_err(|e| {
            qmp_err(
                &format!("blockdev-add {} ({})", node, disk.path.display()),
                e,
            )
        })?;
    plug(
        &shared,
        &qmp,
        "virtio-blk-pci",
        &disk.id,
        port,
        device,
        HotBackend::Block(node),
    )
    .await?;
    let (Some(agent), Some(before)) = (agent, disks_before) else {
        return Ok(());
    };
    let serial = disk.serial.clone();
    until_guest_shows(
        &agent,
        &op,
        "the new disk",
        shared.config.timeouts.hotplug,
        move |info| match &serial {
            Some(serial) => info.disks.iter().any(|d| &d.serial == serial),
            None => info.disks.len() > before,
        },
    )
    .await
}

/// Polls the agent's GuestInfo until `seen` holds, within `limit`;
/// the timeout names `what` the guest never showed.
async fn until_guest_shows(
    agent: &AgentClient,
    op: &str,
    what: &str,
    limit: Duration,
    seen: impl Fn(&vmkit_proto::agent::GuestInfoResponse) -> bool,
) -> vmkit_core::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let info = agent
            .guest_info(ctx(), &GuestInfoRequest::new())
            .await
            .map_err(|e| agent_err(op, "GuestInfo", &e))?;
        if seen(&info) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CoreError::Timeout {
                op: format!("{op}: the guest showing {what}"),
                after: limit,
            });
        }
        sleep(POLL).await;
    }
}

/// How many disks the guest lists.
async fn guest_disk_count(agent: &AgentClient, op: &str) -> vmkit_core::Result<usize> {
    agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .map(|info| info.disks.len())
        .map_err(|e| agent_err(op, "GuestInfo", &e))
}

/// `device_del`s a hot-plugged device, waits for its `DEVICE_DELETED`, then removes
/// its block node or netdev.
pub(crate) async fn remove_device(shared: Arc<Shared>, id: String) -> vmkit_core::Result<()> {
    let op = format!("unplug {id}");
    let Some(device) = crate::instance::lock(&shared.hot_devices)
        .iter()
        .find(|d| d.id == id)
        .cloned()
    else {
        return Err(CoreError::not_found(
            op,
            "no hot-plugged device with that id (cold-plugged devices stay for the VM's life)",
        ));
    };
    let mut events = shared.events.subscribe();
    let qmp = shared.qmp("unplug")?;
    qmp.execute_raw("device_del", Some(json!({ "id": id })))
        .await
        .map_err(|e| qmp_err(&format!("device_del {id}"), e))?;
    let deleted = tokio::time::timeout(shared.config.timeouts.hotplug, async {
        loop {
            match events.recv().await {
                Ok(vmkit_core::VmEvent::DeviceDeleted { id: Some(gone), .. }) if gone == id => {
                    return true;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            }
        }
    })
    .await;
    match deleted {
        Ok(true) => {}
        Ok(false) => {
            return Err(CoreError::backend(op, Error::ShuttingDown));
        }
        Err(_) => {
            return Err(CoreError::Timeout {
                op: format!("{op}: waiting for DEVICE_DELETED (the guest did not release it)"),
                after: shared.config.timeouts.hotplug,
            });
        }
    }
    crate::instance::lock(&shared.hot_devices).retain(|d| d.id != id);
    device.backend.delete(&qmp).await?;
    // Dropping `device` closes the TAP fd vmkit held for a NIC.
    Ok(())
}

/// Adds `nic` on a free reserved root port: its TAP fd goes to QEMU over QMP
/// (`getfd`), then `netdev_add tap` and `virtio-net-pci`; returns once the guest lists
/// its MAC. Any failure removes what was created.
pub(crate) async fn add_nic(shared: Arc<Shared>, nic: NicConfig) -> vmkit_core::Result<()> {
    let op = format!("hotplug_nic {}", nic.id);
    nic.validate("nic")?;
    shared.devices().check_free_id("nic", &nic.id)?;
    let (port, netdev) = free_port_and_name(&shared, &op, &nic.id, "vmkit-hotnet")?;
    let tap: Option<Arc<std::os::fd::OwnedFd>> = match &nic.backend {
        NicBackend::Tap { name } => {
            Some(Arc::new(crate::host::open_tap(name).map_err(|e| {
                CoreError::io(format!("{op}: open TAP {name}"), e)
            })?))
        }
        NicBackend::TapFd { .. } => None,
    };
    let fd: std::os::fd::BorrowedFd<'_> = match (&tap, &nic.backend) {
        (Some(owned), _) => std::os::fd::AsFd::as_fd(owned.as_ref()),
        (None, NicBackend::TapFd { fd }) => {
            // SAFETY: a `TapFd` NIC's fd is the caller's open TAP, kept open while the
            // VM may use it (the `NicBackend::TapFd` contract); it is only borrowed for
            // the `getfd` below, and QEMU takes its own copy.
            #[allow(unsafe_code)]
            unsafe {
                std::os::fd::BorrowedFd::borrow_raw(*fd)
            }
        }
        (None, NicBackend::Tap { .. }) => unreachable_tap(&op)?,
    };
    let mac = nic
        .mac
        .unwrap_or_else(|| crate::devices::stable_mac(&shared.config.id, &nic.id));
    let fdname = format!("{netdev}-fd");
    let qmp = shared.qmp("hotplug_nic")?;
    qmp.execute_raw_with_fd("getfd", Some(json!({ "fdname": fdname })), fd)
        .await
        .map_err(|e| qmp_err(&format!("getfd {fdname} (the TAP fd)"), e))?;
    let netdev_args = json!({"type": "tap", "id": netdev, "fd": fdname});
    if let Err(e) = qmp.execute_raw("netdev_add", Some(netdev_args)).await {
        let _ = qmp
            .execute_raw("closefd", Some(json!({ "fdname": fdname })))
            .await;
        return Err(qmp_err(&format!("netdev_add tap {netdev}"), e));
    }
    let device = json!({
        "driver": "virtio-net-pci",
        "id": nic.id,
        "netdev": netdev,
        "mac": mac.to_string(),
        "bus": port,
    });
    plug(
        &shared,
        &qmp,
        "virtio-net-pci",
        &nic.id,
        port,
        device,
        HotBackend::Net { netdev, _tap: tap },
    )
    .await?;
    let Ok(agent) = agent(&shared).await else {
        return Ok(());
    };
    let mac = mac.to_string();
    until_guest_shows(
        &agent,
        &op,
        &format!("a NIC with MAC {mac}"),
        shared.config.timeouts.hotplug,
        |info| info.nics.iter().any(|n| n.mac == mac),
    )
    .await
}

/// A `Tap` NIC always has the fd opened above; kept total without a panic.
fn unreachable_tap(op: &str) -> vmkit_core::Result<std::os::fd::BorrowedFd<'static>> {
    Err(CoreError::backend(
        op.to_owned(),
        Error::Io {
            op: "open the TAP".into(),
            source: std::io::Error::other("no fd for a TAP NIC"),
        },
    ))
}
