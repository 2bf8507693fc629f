//! Memory hot-plug through virtio-mem (`memory_hotplug = virtio_mem`).
//!
//! One `virtio-mem-pci` device ([`VIRTIO_MEM_ID`]) spans all the room above boot memory
//! from boot on. A hot-plug raises its `requested-size` (`qom-set`); the guest's
//! `virtio_mem` driver plugs the blocks and QEMU's `size` follows. The call returns once
//! the guest's MemTotal shows the memory, and rolls the request back when it does not.
//!
//! Each call is a *grant* with its own id (`vmkit-vmem.<n>`), so the
//! [`MemoryHotplugger`](vmkit_core::MemoryHotplugger) contract is the same as with
//! DIMMs: unplugging a grant lowers the requested size by the grant's size and waits
//! until QEMU reports the guest gave the blocks back. A guest that gives back only part
//! of it keeps the rest: the grant shrinks to what is still plugged, and the error says
//! how much was released.

use tokio::time::{Instant, sleep};
use vmkit_core::{DimmInfo, Error as CoreError};
use vmkit_qmp::qapi_qmp::{MemoryDeviceInfo, VirtioMEMDeviceInfo};

use super::context::{Context, MIB, POLL, guest_memory, qmp_err, until_guest_memory};
use super::state::Grant;
use crate::command::{VIRTIO_MEM_BLOCK_MIB, VIRTIO_MEM_ID};
use crate::devices::free_name;

/// The id prefix of virtio-mem grants (`vmkit-vmem.0`, …).
const GRANT_PREFIX: &str = "vmkit-vmem.";

/// vmkit's virtio-mem device, or an error saying QEMU does not list it.
async fn device(ctx: &Context, op: &str) -> vmkit_core::Result<VirtioMEMDeviceInfo> {
    let devices = ctx
        .qmp()
        .memory_devices()
        .await
        .map_err(|e| qmp_err(op, e))?;
    devices
        .into_iter()
        .filter_map(|d| match d {
            MemoryDeviceInfo::virtio_mem(v) => Some(v.data),
            _ => None,
        })
        .find(|d| d.id.as_deref() == Some(VIRTIO_MEM_ID))
        .ok_or_else(|| {
            CoreError::backend(
                op.to_owned(),
                crate::error::Error::NotListed {
                    what: format!("the virtio-mem device {VIRTIO_MEM_ID} (query-memory-devices)"),
                },
            )
        })
}

async fn set_requested(ctx: &Context, op: &str, bytes: u64) -> vmkit_core::Result<()> {
    let path = format!("/machine/peripheral/{VIRTIO_MEM_ID}");
    ctx.qmp()
        .qom_set(&path, "requested-size", bytes.into())
        .await
        .map_err(|e| {
            qmp_err(
                &format!("{op}: qom-set {VIRTIO_MEM_ID} requested-size={bytes}"),
                e,
            )
        })
}

/// The grants, as DIMM-like entries for `query_memory`.
pub(crate) fn grants(ctx: &Context) -> Vec<DimmInfo> {
    ctx.state()
        .grants()
        .iter()
        .map(|g| DimmInfo {
            id: g.id.clone(),
            size_mib: g.size_mib,
            slot: None,
            address: None,
        })
        .collect()
}

/// Bytes QEMU reports plugged into the guest through virtio-mem.
pub(crate) async fn plugged(ctx: &Context, op: &str) -> vmkit_core::Result<u64> {
    Ok(device(ctx, op).await?.size)
}

/// Grants `size_mib` more to the guest and waits until its MemTotal shows it.
pub(crate) async fn add(ctx: &Context, size_mib: u64) -> vmkit_core::Result<String> {
    let op = format!("hotplug_memory {size_mib} MiB (virtio-mem)");
    // Checked before any QMP command or guest call: the block size is vmkit's own
    // choice, and only vmkit's grants change the request.
    let block_mib = VIRTIO_MEM_BLOCK_MIB;
    if size_mib == 0 || !size_mib.is_multiple_of(block_mib) {
        return Err(CoreError::bad_argument(
            op,
            "size_mib",
            format!("not a multiple of the virtio-mem block size ({block_mib} MiB)"),
        ));
    }
    let res = &ctx.limits().resources;
    let (base, max) = (res.memory_mib, res.max_memory());
    let granted: u64 = ctx.state().grants().iter().map(|g| g.size_mib).sum();
    if base + granted + size_mib > max {
        return Err(CoreError::exhausted(
            op,
            "memory",
            format!(
                "{base} MiB boot + {granted} MiB plugged + {size_mib} MiB exceeds max_memory_mib {max}"
            ),
        ));
    }
    let agent = ctx.agent().await?;
    // The guest's view and QEMU's, asked at once (both are round trips on a busy VM).
    let ((total_before, _), dev) = tokio::try_join!(guest_memory(&agent, &op), device(ctx, &op))?;
    if dev.requested_size + size_mib * MIB > dev.max_size {
        // Someone else (the QMP escape hatch) asked for more than vmkit's grants.
        return Err(CoreError::exhausted(
            op,
            "memory",
            format!(
                "QEMU already has {} MiB requested; {size_mib} MiB more exceeds the device's {} MiB",
                dev.requested_size / MIB,
                dev.max_size / MIB
            ),
        ));
    }
    let target = dev.requested_size + size_mib * MIB;
    set_requested(ctx, &op, target).await?;
    let waited = until_guest_memory(
        &agent,
        &op,
        "the guest plugging the memory (does its kernel load virtio_mem?)",
        total_before + size_mib * MIB,
        ctx.limits().deadline,
    )
    .await;
    if let Err(failure) = waited {
        // Roll back: ask for the old size again (best effort; logged).
        if let Err(e) = set_requested(ctx, &op, dev.requested_size).await {
            tracing::warn!(error = %e, "rollback of a virtio-mem request failed");
        }
        return Err(failure);
    }
    let mut grants = ctx.state().grants();
    let id = free_name(GRANT_PREFIX, grants.iter().map(|g| g.id.as_str()));
    grants.push(Grant {
        id: id.clone(),
        size_mib,
    });
    Ok(id)
}

/// Takes grant `id` back from the guest and waits until QEMU reports it released.
pub(crate) async fn remove(ctx: &Context, id: &str) -> vmkit_core::Result<()> {
    let op = format!("unplug_memory {id} (virtio-mem)");
    let grant = ctx.state().grants().iter().find(|g| g.id == id).cloned();
    let Some(grant) = grant else {
        let present: Vec<String> = grants(ctx).into_iter().map(|g| g.id).collect();
        return Err(CoreError::not_found(
            op,
            format!("no such grant (present: {present:?})"),
        ));
    };
    let dev = device(ctx, &op).await?;
    let target = dev.requested_size.saturating_sub(grant.size_mib * MIB);
    set_requested(ctx, &op, target).await?;
    let deadline = Instant::now() + ctx.limits().deadline;
    let mut size = dev.size;
    loop {
        if size <= target {
            ctx.state().grants().retain(|g| g.id != id);
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        sleep(POLL).await;
        size = device(ctx, &op).await?.size;
    }
    // The guest could not give everything back: keep what is still plugged, stop QEMU
    // asking for more, and shrink the grant to what is left of it.
    let released_mib = dev.size.saturating_sub(size) / MIB;
    if let Err(e) = set_requested(ctx, &op, size).await {
        tracing::warn!(error = %e, "virtio-mem: re-requesting the plugged size failed");
    }
    let mut grants = ctx.state().grants();
    if let Some(g) = grants.iter_mut().find(|g| g.id == id) {
        g.size_mib = g.size_mib.saturating_sub(released_mib);
    }
    grants.retain(|g| g.size_mib > 0);
    Err(CoreError::Timeout {
        op: format!(
            "{op}: the guest released {released_mib} of {} MiB",
            grant.size_mib
        ),
        after: ctx.limits().deadline,
    })
}
