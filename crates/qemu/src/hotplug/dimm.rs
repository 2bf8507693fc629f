//! Memory hot-plug as DIMMs: `object-add` of a RAM backend — memfd, shared, when a
//! vhost-user daemon maps guest RAM — then `device_add pc-dimm`; any failure removes
//! what was created. Unplug ejects the DIMM, then deletes its backend.

use vmkit_core::{DimmInfo, Error as CoreError};
use vmkit_qmp::qapi_qmp::MemoryDeviceInfo;

use super::context::{Context, MIB, guest_memory, qmp_err, until_guest_memory};
use super::eject::eject;
use crate::devices::free_name;
use crate::qmp::Device;

/// The id prefix of hot-plugged DIMMs; the backend object is `<id>-ram`.
const DIMM_ID_PREFIX: &str = "vmkit-mem";

fn backend_id(id: &str) -> String {
    format!("{id}-ram")
}

/// The DIMMs QEMU lists.
pub(crate) async fn list(ctx: &Context, op: &str) -> vmkit_core::Result<Vec<DimmInfo>> {
    let devices = ctx
        .qmp()
        .memory_devices()
        .await
        .map_err(|e| qmp_err(op, e))?;
    Ok(devices
        .into_iter()
        .filter_map(|d| match d {
            MemoryDeviceInfo::dimm(dimm) => Some(dimm.data),
            _ => None,
        })
        .map(|d| DimmInfo {
            id: d.id.unwrap_or_default(),
            size_mib: u64::try_from(d.size).unwrap_or(0) / MIB,
            slot: u32::try_from(d.slot).ok(),
            address: u64::try_from(d.addr).ok(),
        })
        .collect())
}

/// Checks a plug of `size_mib` against the guest's block size, `max_memory_mib` and
/// the free DIMM slots, before anything changes; returns the new DIMM's id.
fn check(
    ctx: &Context,
    op: &str,
    size_mib: u64,
    block: u64,
    present: &[DimmInfo],
) -> vmkit_core::Result<String> {
    let res = &ctx.limits().resources;
    let block_mib = (block / MIB).max(1);
    if size_mib == 0 || !size_mib.is_multiple_of(block_mib) {
        return Err(CoreError::bad_argument(
            op,
            "size_mib",
            format!("not a multiple of the guest's memory block size ({block_mib} MiB)"),
        ));
    }
    let plugged: u64 = present.iter().map(|d| d.size_mib).sum();
    let max = res.max_memory();
    if res.memory_mib + plugged + size_mib > max {
        return Err(CoreError::exhausted(
            op,
            "memory",
            format!(
                "{} MiB boot + {plugged} MiB plugged + {size_mib} MiB exceeds max_memory_mib {max}",
                res.memory_mib
            ),
        ));
    }
    if present.len() >= res.memory_slots as usize {
        return Err(CoreError::exhausted(
            op,
            "DIMM slot",
            format!("all {} DIMM slots are in use", res.memory_slots),
        ));
    }
    Ok(free_name(
        DIMM_ID_PREFIX,
        present.iter().map(|d| d.id.as_str()),
    ))
}

/// Plugs a DIMM of `size_mib` (into `slot`, or where QEMU picks) and waits until the
/// guest's MemTotal shows it. Returns the DIMM's id.
pub(crate) async fn add(
    ctx: &Context,
    size_mib: u64,
    slot: Option<u32>,
) -> vmkit_core::Result<String> {
    let op = format!("hotplug_memory {size_mib} MiB");
    if ctx.limits().resources.memory_slots == 0 {
        return Err(CoreError::config(
            "resources.memory_slots",
            format!("{op}: the VM has no DIMM slots (set memory_slots and max_memory_mib)"),
        ));
    }
    let agent = ctx.agent().await?;
    let (total_before, block) = guest_memory(&agent, &op).await?;
    // A read-only query; nothing changes before the checks pass.
    let present = list(ctx, &op).await?;
    let id = check(ctx, &op, size_mib, block, &present)?;
    let object = backend_id(&id);
    let shared = ctx.limits().shares_ram;
    ctx.qmp()
        .add_ram_backend(&object, size_mib * MIB, shared)
        .await
        .map_err(|e| {
            let kind = if shared {
                "memory-backend-memfd"
            } else {
                "memory-backend-ram"
            };
            qmp_err(&format!("object-add {kind} {object}"), e)
        })?;
    let mut dimm = Device::new("pc-dimm", id.clone()).with("memdev", object.as_str());
    if let Some(slot) = slot {
        dimm = dimm.with("slot", slot);
    }
    if let Err(e) = ctx.qmp().device_add(dimm).await {
        remove_object(ctx, &object).await;
        return Err(qmp_err(
            &format!("device_add pc-dimm {id} ({size_mib} MiB)"),
            e,
        ));
    }
    // Online it (movable, so it can go again) and wait until MemTotal shows it.
    let waited = until_guest_memory(
        &agent,
        &op,
        &format!("the guest onlining {id}"),
        total_before + size_mib * MIB,
        ctx.limits().deadline,
    )
    .await;
    if let Err(failure) = waited {
        // Roll back: the DIMM and its backend go again (best effort; reported in logs).
        if let Err(e) = eject_dimm(ctx, &id).await {
            tracing::warn!(%id, error = %e, "rollback of a DIMM the guest did not online failed");
        }
        return Err(failure);
    }
    Ok(id)
}

/// Deletes a backend object, logging (not failing) when QEMU refuses.
async fn remove_object(ctx: &Context, object: &str) {
    if let Err(e) = ctx.qmp().object_del(object).await {
        tracing::warn!(%object, error = %e, "object-del failed");
    }
}

/// `device_del` the DIMM, wait until QEMU no longer lists it, then delete its backend.
async fn eject_dimm(ctx: &Context, id: &str) -> vmkit_core::Result<()> {
    let op = format!("unplug_memory {id}");
    let op = &op;
    eject(
        ctx,
        op,
        id,
        "QEMU still lists it; the guest did not release the memory",
        || async move { Ok(!list(ctx, op).await?.iter().any(|d| d.id == id)) },
    )
    .await?;
    remove_object(ctx, &backend_id(id)).await;
    Ok(())
}

/// `unplug_memory` of DIMM `id`.
pub(crate) async fn remove(ctx: &Context, id: &str) -> vmkit_core::Result<()> {
    let op = format!("unplug_memory {id}");
    let present = list(ctx, &op).await?;
    if !present.iter().any(|d| d.id == id) {
        return Err(CoreError::not_found(
            op,
            format!(
                "no such DIMM (present: {:?})",
                present.iter().map(|d| d.id.as_str()).collect::<Vec<_>>()
            ),
        ));
    }
    eject_dimm(ctx, id).await
}
