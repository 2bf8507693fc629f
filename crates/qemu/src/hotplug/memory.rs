//! Memory hot-plug, whichever way the VM has it: DIMMs ([`super::dimm`]) or virtio-mem
//! ([`super::virtio_mem`], `memory_hotplug = virtio_mem`). Both give the same
//! `MemoryHotplugger` contract: each plug returns an id that unplugs it.

use vmkit_core::{Error as CoreError, MemoryHotplug, MemoryInfo};

use super::context::{Context, MIB, guest_memory};
use super::{dimm, virtio_mem};

/// `hotplug_memory` of `size_mib`, into DIMM slot `slot` when given.
pub(crate) async fn add(
    ctx: &Context,
    size_mib: u64,
    slot: Option<u32>,
) -> vmkit_core::Result<String> {
    match (ctx.limits().resources.memory_hotplug, slot) {
        (MemoryHotplug::Dimm, _) => dimm::add(ctx, size_mib, slot).await,
        (MemoryHotplug::VirtioMem, None) => virtio_mem::add(ctx, size_mib).await,
        (MemoryHotplug::VirtioMem, Some(slot)) => Err(CoreError::bad_argument(
            format!("hotplug_memory {size_mib} MiB in slot {slot}"),
            "slot",
            "virtio-mem has no DIMM slots",
        )),
    }
}

/// `unplug_memory` of what plug `id` added.
pub(crate) async fn remove(ctx: &Context, id: &str) -> vmkit_core::Result<()> {
    match ctx.limits().resources.memory_hotplug {
        MemoryHotplug::Dimm => dimm::remove(ctx, id).await,
        MemoryHotplug::VirtioMem => virtio_mem::remove(ctx, id).await,
    }
}

/// `query_memory`: boot, plugged and maximum memory, the plugs, and the guest's
/// MemTotal when the guest can answer.
pub(crate) async fn query(ctx: &Context) -> vmkit_core::Result<MemoryInfo> {
    let op = "query_memory";
    let (dimms, plugged_mib) = match ctx.limits().resources.memory_hotplug {
        MemoryHotplug::Dimm => {
            let dimms = dimm::list(ctx, op).await?;
            let plugged = dimms.iter().map(|d| d.size_mib).sum();
            (dimms, plugged)
        }
        // QEMU's view of what is plugged; the grants say who asked for it.
        MemoryHotplug::VirtioMem => (
            virtio_mem::grants(ctx),
            virtio_mem::plugged(ctx, op).await? / MIB,
        ),
    };
    let guest_total_mib = match ctx.agent_for_query().await {
        Some(agent) => Some(guest_memory(&agent, op).await?.0 / MIB),
        None => None,
    };
    let res = &ctx.limits().resources;
    Ok(MemoryInfo {
        base_mib: res.memory_mib,
        plugged_mib,
        max_mib: res.max_memory(),
        dimms,
        guest_total_mib,
    })
}
