//! Disk and NIC hot-plug on the reserved PCIe root ports, and `unplug(id)` of them.
//! Each plug creates the backend (block node, or TAP fd + netdev) and then the device
//! on a free port; a refused device takes its backend with it.

use std::os::fd::AsFd;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use vmkit_core::{
    DeviceSpec, DiskConfig, Error as CoreError, HostFd, NicBackend, NicConfig, ShareConfig,
    ShareVia, VmEvent,
};
use vmkit_proto::AgentClient;

use super::context::{Context, POLL, guest_info, qmp_err};
use crate::devices::{HotBackend, Reservation, virtio_fs_device, virtiofsd_launch};
use crate::error::Error;
use crate::fs_daemon::FsDaemon;
use crate::qmp::Device;

/// Deletes a device's backend object in QEMU: `blockdev-del` or `netdev_del`.
async fn delete_backend(ctx: &Context, backend: &HotBackend) -> vmkit_core::Result<()> {
    let (command, result) = match backend {
        HotBackend::Block(node) => ("blockdev-del", ctx.qmp().blockdev_del(node).await),
        HotBackend::Net { netdev, .. } => ("netdev_del", ctx.qmp().netdev_del(netdev).await),
        HotBackend::Chardev(id) => ("chardev-remove", ctx.qmp().chardev_remove(id).await),
    };
    result.map_err(|e| qmp_err(&format!("{command} {}", backend.name()), e))
}

/// `device_add`s `device` (a `driver` with id `id`) on the reserved port over `backend`
/// (served by `daemon`) and records it as attached. When QEMU refuses, the backend is
/// deleted again, the daemon stopped, the reservation dropped, and QEMU's words come
/// back in the error.
async fn plug(
    ctx: &Context,
    reserved: Reservation,
    device: Device,
    backend: HotBackend,
    daemon: Option<FsDaemon>,
) -> vmkit_core::Result<()> {
    let (driver, id) = (device.driver().to_owned(), device.id().to_owned());
    if let Err(e) = ctx.qmp().device_add(device).await {
        if let Err(del) = delete_backend(ctx, &backend).await {
            tracing::warn!(backend = backend.name(), error = %del, "deleting the backend after a failed device_add failed");
        }
        let port = reserved.port().to_owned();
        return Err(qmp_err(&format!("device_add {driver} {id} on {port}"), e));
    }
    reserved.attached(backend, daemon);
    Ok(())
}

/// A free reserved root port and backend name `<prefix><n>` for `spec`, or why not.
fn reserve(
    ctx: &Context,
    op: &str,
    spec: DeviceSpec,
    prefix: &str,
) -> vmkit_core::Result<Reservation> {
    ctx.devices()
        .reserve(op, spec, ctx.limits().hotplug_ports, prefix)
}

/// Adds `disk` on a free reserved root port and waits until the guest lists it (by
/// serial when it has one, else by a new disk appearing).
pub(crate) async fn add_disk(ctx: &Context, disk: DiskConfig) -> vmkit_core::Result<()> {
    let op = format!("hotplug_disk {}", disk.id);
    let field = "disk";
    disk.validate(field)?;
    let reserved = reserve(ctx, &op, DeviceSpec::Disk(disk.clone()), "vmkit-hot")?;
    let (port, node) = (reserved.port().to_owned(), reserved.name().to_owned());
    let agent = ctx.agent().await.ok();
    // With a serial the new disk is recognised by it; without, by the count going up.
    let disks_before = match (&agent, &disk.serial) {
        (Some(agent), None) => Some(guest_disk_count(agent, &op).await?),
        (Some(_), Some(_)) => Some(0),
        (None, _) => None,
    };
    let (blockdev, device) = crate::devices::disk_json(&node, &disk, ctx.limits().machine);
    let device = Device::from_json(device).on(port.clone());
    ctx.qmp().blockdev_add(blockdev).await.map_err(|e| {
        qmp_err(
            &format!("blockdev-add {} ({})", node, disk.path.display()),
            e,
        )
    })?;
    plug(ctx, reserved, device, HotBackend::Block(node), None).await?;
    let (Some(agent), Some(before)) = (agent, disks_before) else {
        return Ok(());
    };
    let serial = disk.serial.clone();
    until_guest_shows(
        &agent,
        &op,
        "the new disk",
        ctx.limits().deadline,
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
        let info = guest_info(agent, op).await?;
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
    guest_info(agent, op).await.map(|info| info.disks.len())
}

/// `device_del`s a hot-plugged device, waits for its `DEVICE_DELETED`, then removes
/// its block node or netdev.
pub(crate) async fn remove_device(ctx: &Context, id: &str) -> vmkit_core::Result<()> {
    let op = format!("unplug {id}");
    ctx.devices().begin_unplug(&op, id)?;
    let result = delete_device(ctx, &op, id).await;
    if result.is_err() {
        ctx.devices().unplug_failed(id);
    }
    result?;
    // Dropping the place closes the TAP fd vmkit held for a NIC.
    let Some(removed) = ctx.devices().remove(id) else {
        return Ok(());
    };
    if let Some(daemon) = removed.daemon {
        daemon.stop().await;
    }
    if let Some(backend) = removed.place.and_then(|p| p.backend) {
        delete_backend(ctx, &backend).await?;
    }
    Ok(())
}

/// `device_del` of `id`, waiting for its `DEVICE_DELETED`; the request is repeated
/// every `unplug_ask_again` of the limits while the guest has not answered (a guest
/// can miss a request made while it still handles the plug). A repeat QEMU refuses
/// (the last request is still pending) changes nothing.
async fn delete_device(ctx: &Context, op: &str, id: &str) -> vmkit_core::Result<()> {
    let mut events = ctx.subscribe();
    ctx.qmp()
        .device_del(id)
        .await
        .map_err(|e| qmp_err(&format!("device_del {id}"), e))?;
    let limits = ctx.limits();
    let deadline = tokio::time::Instant::now() + limits.deadline;
    let mut asks = 1u32;
    loop {
        let wait_until = (tokio::time::Instant::now() + limits.unplug_ask_again).min(deadline);
        match tokio::time::timeout_at(wait_until, device_deleted(&mut events, id)).await {
            Ok(true) => return Ok(()),
            Ok(false) => return Err(CoreError::backend(op.to_owned(), Error::ShuttingDown)),
            Err(_) if wait_until >= deadline => {
                return Err(CoreError::Timeout {
                    op: format!(
                        "{op}: waiting for DEVICE_DELETED (the guest did not release it; \
                         asked {asks} times)"
                    ),
                    after: limits.deadline,
                });
            }
            Err(_) => {
                asks += 1;
                if let Err(e) = ctx.qmp().device_del(id).await {
                    tracing::debug!(device = id, error = %e, "device_del repeated: refused");
                }
            }
        }
    }
}

/// Waits for `id`'s `DEVICE_DELETED`: true, or false once the VM's events end.
async fn device_deleted(
    events: &mut tokio::sync::broadcast::Receiver<vmkit_core::VmEvent>,
    id: &str,
) -> bool {
    loop {
        match events.recv().await {
            Ok(vmkit_core::VmEvent::DeviceDeleted { id: Some(gone), .. }) if gone == id => {
                return true;
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
        }
    }
}

/// Adds `nic` on a free reserved root port: its TAP fd goes to QEMU over QMP
/// (`getfd`), then `netdev_add tap` and `virtio-net-pci`; returns once the guest lists
/// its MAC. Any failure removes what was created.
pub(crate) async fn add_nic(ctx: &Context, nic: NicConfig) -> vmkit_core::Result<()> {
    let op = format!("hotplug_nic {}", nic.id);
    nic.validate("nic")?;
    let reserved = reserve(ctx, &op, DeviceSpec::Nic(nic.clone()), "vmkit-hotnet")?;
    let (port, netdev) = (reserved.port().to_owned(), reserved.name().to_owned());
    // The VM holds the TAP for as long as the NIC exists: one vmkit opened (closing
    // it removes a TAP vmkit created) or the caller's.
    let tap: HostFd = match &nic.backend {
        NicBackend::Tap { name } => crate::host::open_tap(name)
            .map_err(|e| CoreError::io(format!("{op}: open TAP {name}"), e))?
            .into(),
        NicBackend::TapFd { fd } => fd.clone(),
        NicBackend::User | NicBackend::Stream { .. } | NicBackend::Vmnet { .. } => {
            return Err(CoreError::unsupported(
                op,
                crate::BACKEND_NAME,
                "hot-plug takes TAP NICs; user, stream and vmnet NICs are cold-plugged",
            ));
        }
    };
    let mac = nic
        .mac
        .unwrap_or_else(|| crate::devices::stable_mac(&ctx.limits().vm_id, &nic.id));
    let fdname = format!("{netdev}-fd");
    ctx.qmp()
        .getfd(&fdname, tap.as_fd())
        .await
        .map_err(|e| qmp_err(&format!("getfd {fdname} (the TAP fd)"), e))?;
    if let Err(e) = ctx.qmp().add_tap_netdev(&netdev, &fdname).await {
        if let Err(close) = ctx.qmp().closefd(&fdname).await {
            tracing::warn!(%fdname, error = %close, "closefd after a failed netdev_add failed");
        }
        return Err(qmp_err(&format!("netdev_add tap {netdev}"), e));
    }
    let device = Device::new("virtio-net-pci", nic.id.clone())
        .on(port.clone())
        .with("netdev", netdev.as_str())
        .with("mac", mac.to_string());
    plug(
        ctx,
        reserved,
        device,
        HotBackend::Net { netdev, _tap: tap },
        None,
    )
    .await?;
    let Ok(agent) = ctx.agent().await else {
        return Ok(());
    };
    let mac = mac.to_string();
    until_guest_shows(
        &agent,
        &op,
        &format!("a NIC with MAC {mac}"),
        ctx.limits().deadline,
        |info| info.nics.iter().any(|n| n.mac == mac),
    )
    .await
}

/// Adds `share` over virtio-fs on a free reserved root port: its virtiofsd first (its
/// death afterwards is published as `DeviceFailed`), then the chardev to it and
/// `vhost-user-fs-pci`; returns once the guest's driver has bound one more
/// shared-directory device. A virtio-9p share is cold only. Any failure removes what
/// was created, the daemon included.
pub(crate) async fn add_share(ctx: &Context, share: ShareConfig) -> vmkit_core::Result<()> {
    let op = format!("hotplug_share {}", share.id);
    share.validate("share")?;
    let share = ctx.devices().resolve_share(&op, share)?;
    if share.via != ShareVia::VirtioFs {
        return Err(CoreError::unsupported(
            op,
            crate::BACKEND_NAME,
            "a virtio-9p share is cold only: QEMU's QMP cannot add an -fsdev to a running \
             VM; add it before start, or share over virtio-fs (virtiofsd)",
        ));
    }
    let reserved = reserve(ctx, &op, DeviceSpec::Share(share.clone()), "vmkit-hotfs")?;
    let (port, chardev) = (reserved.port().to_owned(), reserved.name().to_owned());
    let agent = ctx.agent().await.ok();
    let before = match &agent {
        Some(agent) => Some(guest_info(agent, &op).await?.fs_devices.len()),
        None => None,
    };
    let limits = ctx.limits();
    let launch = virtiofsd_launch(
        &share,
        &limits.virtiofsd,
        &limits.state_dir,
        &limits.log_dir,
        &chardev,
    );
    let socket = launch.socket.clone();
    let events = ctx.publisher();
    let id = share.id.clone();
    let on_exit = move |reason| {
        let _ = events.send(VmEvent::DeviceFailed { id, reason });
    };
    let deadline = Instant::now() + limits.deadline;
    let daemon = FsDaemon::spawn(&op, &share, launch, deadline, on_exit).await?;
    ctx.qmp()
        .add_unix_chardev(&chardev, &socket)
        .await
        .map_err(|e| qmp_err(&format!("chardev-add {chardev} ({})", socket.display()), e))?;
    let device = Device::from_json(virtio_fs_device(&share, &chardev, limits.machine)).on(port);
    plug(
        ctx,
        reserved,
        device,
        HotBackend::Chardev(chardev),
        Some(daemon),
    )
    .await?;
    let (Some(agent), Some(before)) = (agent, before) else {
        return Ok(());
    };
    until_guest_shows(
        &agent,
        &op,
        "a new shared-directory device",
        limits.deadline,
        move |info| info.fs_devices.len() > before,
    )
    .await
}
