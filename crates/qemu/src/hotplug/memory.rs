//! Memory hot-plug ([`MemoryHotplugger`]) as DIMMs: `object-add` of a RAM backend —
//! memfd, shared, when a vhost-user daemon maps guest RAM — then `device_add pc-dimm`;
//! any failure removes what was created. With `memory_hotplug = virtio_mem` the calls go
//! to [`super::virtio_mem`] instead.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use vmkit_core::{
    DimmInfo, Error as CoreError, MemoryHotplug, MemoryHotplugger, MemoryInfo, VmState,
};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{GuestInfoRequest, WaitResourcesRequest};

use super::{
    MIB, agent, agent_err, agent_for_query, ctx, eject, qmp_err, qmp_query, upgrade, virtio_mem,
    wait_in_guest,
};
use crate::error::Error;
use crate::instance::Shared;

/// The id prefix of hot-plugged DIMMs; the backend object is `<id>-ram`.
const DIMM_ID_PREFIX: &str = "vmkit-mem";

/// An entry of `query-memory-devices`; `data` depends on the `type`.
#[derive(Debug, Clone, Deserialize)]
struct MemoryDevice {
    #[serde(rename = "type")]
    kind: String,
    data: serde_json::Value,
}

/// The `data` of the `query-memory-devices` entries of type `kind`, read as `T`.
pub(super) async fn memory_devices<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    op: &str,
    kind: &str,
) -> vmkit_core::Result<Vec<T>> {
    let devices: Vec<MemoryDevice> = qmp_query(shared, op, "query-memory-devices").await?;
    devices
        .into_iter()
        .filter(|d| d.kind == kind)
        .map(|d| {
            serde_json::from_value(d.data).map_err(|e| {
                CoreError::backend(
                    op.to_owned(),
                    Error::QmpAnswer {
                        command: format!("query-memory-devices ({kind})"),
                        reason: e.to_string(),
                    },
                )
            })
        })
        .collect()
}

/// A DIMM's `data` in `query-memory-devices`.
#[derive(Debug, Clone, Deserialize)]
struct DimmData {
    #[serde(default)]
    id: Option<String>,
    size: u64,
    #[serde(default)]
    slot: Option<u32>,
    #[serde(default)]
    addr: Option<u64>,
}

fn backend_id(id: &str) -> String {
    format!("{id}-ram")
}

async fn dimms(shared: &Shared, op: &str) -> vmkit_core::Result<Vec<DimmInfo>> {
    let devices: Vec<DimmData> = memory_devices(shared, op, "dimm").await?;
    Ok(devices
        .into_iter()
        .map(|d| DimmInfo {
            id: d.id.unwrap_or_default(),
            size_mib: d.size / MIB,
            slot: d.slot,
            address: d.addr,
        })
        .collect())
}

/// The guest's MemTotal and memory block size, in bytes.
pub(super) async fn guest_memory(agent: &AgentClient, op: &str) -> vmkit_core::Result<(u64, u64)> {
    agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .map(|info| (info.mem_total_bytes, info.memory_block_size_bytes))
        .map_err(|e| agent_err(op, "GuestInfo", &e))
}

/// Memory hot-plug for one VM; holds the VM weakly.
pub(crate) struct Memory {
    pub(crate) shared: Weak<Shared>,
}

impl Memory {
    fn shared(&self, op: &'static str) -> vmkit_core::Result<Arc<Shared>> {
        upgrade(&self.shared, op)
    }

    /// [`MemoryHotplugger::hotplug_memory`] with the DIMM slot chosen by the caller
    /// (`None`: QEMU picks). QEMU's refusal of a slot comes back in the error, and the
    /// backend object made for it is removed again.
    pub(crate) async fn hotplug_at(
        &self,
        size_mib: u64,
        slot: Option<u32>,
    ) -> vmkit_core::Result<String> {
        let shared = self.shared("hotplug_memory")?;
        shared
            .state
            .require("hotplug_memory", &[VmState::Running])?;
        let job_shared = Arc::clone(&shared);
        shared
            .hotplug
            .run(
                &shared,
                format!("hotplug_memory {size_mib} MiB"),
                async move {
                    match (job_shared.config.resources.memory_hotplug, slot) {
                        (MemoryHotplug::Dimm, _) => add_memory(job_shared, size_mib, slot).await,
                        (MemoryHotplug::VirtioMem, None) => {
                            virtio_mem::add(job_shared, size_mib).await
                        }
                        (MemoryHotplug::VirtioMem, Some(slot)) => Err(CoreError::bad_argument(
                            format!("hotplug_memory {size_mib} MiB in slot {slot}"),
                            "slot",
                            "virtio-mem has no DIMM slots",
                        )),
                    }
                },
            )
            .await
    }
}

async fn add_memory(
    shared: Arc<Shared>,
    size_mib: u64,
    slot: Option<u32>,
) -> vmkit_core::Result<String> {
    let op = format!("hotplug_memory {size_mib} MiB");
    let res = &shared.config.resources;
    let field = "size_mib";
    if res.memory_slots == 0 {
        return Err(CoreError::config(
            "resources.memory_slots",
            format!("{op}: the VM has no DIMM slots (set memory_slots and max_memory_mib)"),
        ));
    }
    let agent = agent(&shared).await?;
    let (total_before, block) = guest_memory(&agent, &op).await?;
    let block_mib = (block / MIB).max(1);
    if size_mib == 0 || !size_mib.is_multiple_of(block_mib) {
        return Err(CoreError::bad_argument(
            op,
            field,
            format!("not a multiple of the guest's memory block size ({block_mib} MiB)"),
        ));
    }
    // A read-only query; nothing changes before the checks pass.
    let present = dimms(&shared, &op).await?;
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
    let id = (0..)
        .map(|n| format!("{DIMM_ID_PREFIX}{n}"))
        .find(|candidate| present.iter().all(|d| &d.id != candidate))
        .unwrap_or_else(|| format!("{DIMM_ID_PREFIX}x"));
    let object = backend_id(&id);
    // A vhost-user daemon must see guest RAM: hot-added RAM too (QEMU would accept a
    // private backend silently).
    let qom_type = if shared.shares_ram() {
        "memory-backend-memfd"
    } else {
        "memory-backend-ram"
    };
    let mut backend = json!({"qom-type": qom_type, "id": object, "size": size_mib * MIB});
    if shared.shares_ram() {
        backend["share"] = json!(true);
    }
    let qmp = shared.qmp("hotplug_memory")?;
    qmp.execute_raw("object-add", Some(backend))
        .await
        .map_err(|e| qmp_err(&format!("object-add {qom_type} {object}"), e))?;
    let mut dimm = json!({"driver": "pc-dimm", "id": id, "memdev": object});
    if let Some(slot) = slot {
        dimm["slot"] = json!(slot);
    }
    if let Err(e) = qmp.execute_raw("device_add", Some(dimm)).await {
        remove_object(&shared, &object).await;
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
        shared.config.timeouts.hotplug,
    )
    .await;
    if let Err(failure) = waited {
        // Roll back: the DIMM and its backend go again (best effort; reported in logs).
        if let Err(e) = remove_dimm(&shared, &id).await {
            tracing::warn!(%id, error = %e, "rollback of a DIMM the guest did not online failed");
        }
        return Err(failure);
    }
    Ok(id)
}

/// Waits up to `limit` until the guest's MemTotal reaches `at_least` bytes; the agent
/// waits in the guest and onlines new blocks (movable) when the guest's own helper is
/// slow. A timeout names `what` was awaited.
pub(super) async fn until_guest_memory(
    agent: &AgentClient,
    op: &str,
    what: &str,
    at_least: u64,
    limit: Duration,
) -> vmkit_core::Result<()> {
    let mut req = WaitResourcesRequest::new();
    req.mem_total_at_least = at_least;
    wait_in_guest(agent, op, what, req, limit).await.map(drop)
}

/// Deletes a backend object, logging (not failing) when QEMU refuses.
async fn remove_object(shared: &Shared, object: &str) {
    if let Ok(qmp) = shared.qmp("hotplug")
        && let Err(e) = qmp
            .execute_raw("object-del", Some(json!({ "id": object })))
            .await
    {
        tracing::warn!(%object, error = %e, "object-del failed");
    }
}

/// `device_del` the DIMM, wait until QEMU no longer lists it, then delete its backend.
async fn remove_dimm(shared: &Shared, id: &str) -> vmkit_core::Result<()> {
    let op = format!("unplug_memory {id}");
    let op = &op;
    eject(
        shared,
        op,
        id,
        "QEMU still lists it; the guest did not release the memory",
        || async move { Ok(!dimms(shared, op).await?.iter().any(|d| d.id == id)) },
    )
    .await?;
    remove_object(shared, &backend_id(id)).await;
    Ok(())
}

#[async_trait]
impl MemoryHotplugger for Memory {
    async fn query_memory(&self) -> vmkit_core::Result<MemoryInfo> {
        let shared = self.shared("query_memory")?;
        shared
            .state
            .require("query_memory", &[VmState::Running, VmState::Paused])?;
        let job_shared = Arc::clone(&shared);
        shared
            .hotplug
            .run(&shared, "query_memory".into(), async move {
                let shared = job_shared;
                let op = "query_memory";
                let (dimms, plugged_mib) = match shared.config.resources.memory_hotplug {
                    MemoryHotplug::Dimm => {
                        let dimms = dimms(&shared, op).await?;
                        let plugged = dimms.iter().map(|d| d.size_mib).sum();
                        (dimms, plugged)
                    }
                    // QEMU's view of what is plugged; the grants say who asked for it.
                    MemoryHotplug::VirtioMem => (
                        virtio_mem::grants(&shared),
                        virtio_mem::plugged(&shared, op).await? / MIB,
                    ),
                };
                let guest_total_mib = match agent_for_query(&shared).await {
                    Some(agent) => Some(guest_memory(&agent, "query_memory").await?.0 / MIB),
                    None => None,
                };
                let res = &shared.config.resources;
                Ok(MemoryInfo {
                    base_mib: res.memory_mib,
                    plugged_mib,
                    max_mib: res.max_memory(),
                    dimms,
                    guest_total_mib,
                })
            })
            .await
    }

    async fn hotplug_memory(&self, size_mib: u64) -> vmkit_core::Result<String> {
        self.hotplug_at(size_mib, None).await
    }

    async fn unplug_memory(&self, id: &str) -> vmkit_core::Result<()> {
        let shared = self.shared("unplug_memory")?;
        shared.state.require("unplug_memory", &[VmState::Running])?;
        let (job_shared, id) = (Arc::clone(&shared), id.to_owned());
        shared
            .hotplug
            .run(&shared, format!("unplug_memory {id}"), async move {
                if job_shared.config.resources.memory_hotplug == MemoryHotplug::VirtioMem {
                    return virtio_mem::remove(job_shared, id).await;
                }
                let op = format!("unplug_memory {id}");
                let present = dimms(&job_shared, &op).await?;
                if !present.iter().any(|d| d.id == id) {
                    return Err(CoreError::not_found(
                        op,
                        format!(
                            "no such DIMM (present: {:?})",
                            present.iter().map(|d| d.id.as_str()).collect::<Vec<_>>()
                        ),
                    ));
                }
                remove_dimm(&job_shared, &id).await
            })
            .await
    }
}
