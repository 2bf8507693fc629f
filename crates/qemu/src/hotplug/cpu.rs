//! vCPU hot-plug ([`CpuHotplugger`]): `query-hotpluggable-cpus` gives the free slots,
//! `device_add` fills the first one (id `vmkit-cpu<socket>-<core>-<thread>`), and the
//! agent onlines it; the call returns once the guest reports it online. Unplug is
//! `device_del`, confirmed by `query-cpus-fast` no longer listing the CPU (one event is
//! not trusted: GUEST.md).
//!
//! Under TCG, QEMU gives every vCPU thread it ever starts a translation context and
//! never reuses an unplugged one's; a VM can therefore start at most `max_vcpus` vCPU
//! threads in its life. Plugging one more aborts QEMU 10.0, so vmkit refuses it with
//! `Unsupported` and QEMU keeps running. KVM has no such limit.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use vmkit_core::{
    Accel, CpuFailure, CpuHotplugger, CpuInfo, CpuTopology, Error as CoreError, VcpuResize, VmState,
};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{GuestInfoRequest, WaitResourcesRequest};

use super::{
    agent, agent_err, agent_for_query, ctx, eject, qmp_err, qmp_query, upgrade, wait_in_guest,
};
use crate::BACKEND_NAME;
use crate::error::Error;
use crate::instance::Shared;

/// The id prefix of hot-plugged vCPUs.
const CPU_ID_PREFIX: &str = "vmkit-cpu";

/// A slot of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, Deserialize)]
struct Slot {
    #[serde(rename = "type")]
    driver: String,
    props: Props,
    #[serde(rename = "qom-path")]
    qom_path: Option<String>,
}

/// A vCPU's topology as QMP writes it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
struct Props {
    #[serde(rename = "socket-id", default)]
    socket: u32,
    #[serde(rename = "core-id", default)]
    core: u32,
    #[serde(rename = "thread-id", default)]
    thread: u32,
}

impl Props {
    fn topology(self) -> CpuTopology {
        CpuTopology {
            socket: self.socket,
            core: self.core,
            thread: self.thread,
        }
    }

    fn device_id(self) -> String {
        format!(
            "{CPU_ID_PREFIX}{}-{}-{}",
            self.socket, self.core, self.thread
        )
    }
}

/// A present vCPU of `query-cpus-fast`.
#[derive(Debug, Clone, Deserialize)]
struct Present {
    #[serde(rename = "cpu-index")]
    index: u32,
    props: Props,
    #[serde(rename = "qom-path")]
    qom_path: String,
}

/// vCPU hot-plug for one VM; holds the VM weakly.
pub(crate) struct Cpus {
    pub(crate) shared: Weak<Shared>,
}

impl Cpus {
    fn shared(&self, op: &'static str) -> vmkit_core::Result<Arc<Shared>> {
        upgrade(&self.shared, op)
    }
}

async fn slots(shared: &Shared, op: &str) -> vmkit_core::Result<Vec<Slot>> {
    qmp_query(shared, op, "query-hotpluggable-cpus").await
}

async fn present(shared: &Shared, op: &str) -> vmkit_core::Result<Vec<Present>> {
    let mut cpus: Vec<Present> = qmp_query(shared, op, "query-cpus-fast").await?;
    cpus.sort_by_key(|c| c.index);
    Ok(cpus)
}

/// The CPUs the guest has online, through the agent.
async fn guest_online(agent: &AgentClient, op: &str) -> vmkit_core::Result<Vec<u32>> {
    agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .map(|info| info.online_cpus)
        .map_err(|e| agent_err(op, "GuestInfo", &e))
}

async fn query(shared: Arc<Shared>) -> vmkit_core::Result<Vec<CpuInfo>> {
    let op = "query_cpus";
    let cpus = present(&shared, op).await?;
    let online = match agent_for_query(&shared).await {
        Some(agent) => Some(guest_online(&agent, op).await?),
        None => None,
    };
    Ok(cpus
        .into_iter()
        .map(|c| CpuInfo {
            index: c.index,
            topology: c.props.topology(),
            device_id: c
                .qom_path
                .contains(CPU_ID_PREFIX)
                .then(|| c.props.device_id()),
            online: online.as_ref().map(|set| set.contains(&c.index)),
        })
        .collect())
}

/// The slot to fill: `at`, or the first free one.
fn pick(all: &[Slot], at: Option<CpuTopology>, max: u32) -> vmkit_core::Result<&Slot> {
    let Some(at) = at else {
        let mut free: Vec<&Slot> = all.iter().filter(|s| s.qom_path.is_none()).collect();
        free.sort_by_key(|s| (s.props.socket, s.props.core, s.props.thread));
        return free.first().copied().ok_or_else(|| {
            CoreError::exhausted(
                "hotplug_cpu",
                "vCPU slot",
                format!("all {max} vCPUs are present (resources.max_vcpus)"),
            )
        });
    };
    let op = format!(
        "hotplug_cpu_at socket={} core={} thread={}",
        at.socket, at.core, at.thread
    );
    match all.iter().find(|s| s.props.topology() == at) {
        None => {
            let mut slots: Vec<String> = all
                .iter()
                .map(|s| format!("{}/{}/{}", s.props.socket, s.props.core, s.props.thread))
                .collect();
            slots.sort();
            Err(CoreError::not_found(
                op,
                format!(
                    "no such vCPU slot (socket/core/thread: {})",
                    slots.join(", ")
                ),
            ))
        }
        Some(s) if s.qom_path.is_some() => Err(CoreError::bad_argument(
            op,
            "at",
            "the slot holds a vCPU already",
        )),
        Some(s) => Ok(s),
    }
}

async fn add_one(shared: Arc<Shared>, at: Option<CpuTopology>) -> vmkit_core::Result<CpuInfo> {
    let op = "hotplug_cpu";
    let all = slots(&shared, op).await?;
    let max = shared.config.resources.max_vcpus;
    let slot = pick(&all, at, max)?;
    // A slot named out of order gets the guest's lowest free CPU number, not QEMU's
    // cpu-index: the guest is watched for one more online CPU instead (its CPUs now).
    let named = match at {
        Some(_) => {
            let agent = agent(&shared).await?;
            let before = guest_online(&agent, op).await?;
            Some((agent, before))
        }
        None => None,
    };
    tcg_has_room(&shared, max)?;
    let id = slot.props.device_id();
    let args = json!({
        "driver": slot.driver,
        "id": id,
        "socket-id": slot.props.socket,
        "core-id": slot.props.core,
        "thread-id": slot.props.thread,
    });
    let qmp = shared.qmp(op)?;
    qmp.execute_raw("device_add", Some(args))
        .await
        .map_err(|e| {
            qmp_err(
                &format!(
                    "device_add cpu socket={} core={} thread={}",
                    slot.props.socket, slot.props.core, slot.props.thread
                ),
                e,
            )
        })?;
    shared.life().vcpu_threads += 1;
    let index = present(&shared, op)
        .await?
        .into_iter()
        .find(|c| c.props == slot.props)
        .map(|c| c.index)
        .ok_or_else(|| {
            CoreError::backend(
                op,
                Error::NotListed {
                    what: format!("{id} after its device_add"),
                },
            )
        })?;
    until_guest_onlines(&shared, named, index, &id).await?;
    Ok(CpuInfo {
        index,
        topology: slot.props.topology(),
        device_id: Some(id),
        online: Some(true),
    })
}

/// QEMU's multi-threaded TCG gives each vCPU thread a translation context and never
/// takes an unplugged vCPU's back: a VM can start at most `max` (max_vcpus) vCPU threads
/// in its life, and one more aborts QEMU (`tcg_register_thread: assertion failed:
/// (n < tcg_max_ctxs)`, QEMU 10.0). Refused instead.
fn tcg_has_room(shared: &Shared, max: u32) -> vmkit_core::Result<()> {
    let life = shared.life();
    if life.accel == Some(Accel::Tcg) && life.vcpu_threads >= max {
        return Err(CoreError::unsupported(
            "hotplug_cpu",
            BACKEND_NAME,
            format!(
                "under TCG QEMU starts at most max_vcpus ({max}) vCPU threads in a VM's life \
                 and never reuses an unplugged vCPU's; {} have started, and one more would \
                 abort QEMU",
                life.vcpu_threads
            ),
        ));
    }
    Ok(())
}

/// Waits until the guest has the vCPU QEMU lists as `index` (device `id`) online. The
/// guest's uevent helper usually onlines it; the agent waits for it in the guest and
/// onlines it itself when the helper is slow. A slot named out of order (`named`: the
/// agent and the guest's CPUs before the plug) is watched for one more online CPU.
async fn until_guest_onlines(
    shared: &Arc<Shared>,
    named: Option<(AgentClient, Vec<u32>)>,
    index: u32,
    id: &str,
) -> vmkit_core::Result<()> {
    let op = "hotplug_cpu";
    let limit = shared.config.timeouts.hotplug;
    if let Some((agent, before)) = named {
        return until_one_more_online(&agent, op, &before, id, limit).await;
    }
    let agent = agent(shared).await?;
    let mut req = WaitResourcesRequest::new();
    req.cpus = vec![index];
    wait_in_guest(
        &agent,
        op,
        &format!("the guest onlining cpu{index} ({id})"),
        req,
        limit,
    )
    .await
    .map(drop)
}

/// Waits until the guest has a CPU online that is not in `before`, asking the agent to
/// online what is offline every [`super::POLL`], within `limit`.
async fn until_one_more_online(
    agent: &AgentClient,
    op: &str,
    before: &[u32],
    id: &str,
    limit: std::time::Duration,
) -> vmkit_core::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut req = vmkit_proto::agent::OnlineResourcesRequest::new();
        req.cpus = true;
        agent
            .online_resources(ctx(), &req)
            .await
            .map_err(|e| agent_err(op, "OnlineResources", &e))?;
        if guest_online(agent, op)
            .await?
            .iter()
            .any(|cpu| !before.contains(cpu))
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CoreError::Timeout {
                op: format!("{op}: the guest onlining {id}"),
                after: limit,
            });
        }
        tokio::time::sleep(super::POLL).await;
    }
}

async fn remove_one(shared: Arc<Shared>, index: u32) -> vmkit_core::Result<()> {
    let op = "unplug_cpu";
    let cpus = present(&shared, op).await?;
    let Some(cpu) = cpus.iter().find(|c| c.index == index) else {
        return Err(CoreError::not_found(
            format!("unplug_cpu {index}"),
            format!(
                "no vCPU {index} (present: {:?})",
                cpus.iter().map(|c| c.index).collect::<Vec<_>>()
            ),
        ));
    };
    if !cpu.qom_path.contains(CPU_ID_PREFIX) {
        return Err(CoreError::bad_argument(
            format!("unplug_cpu {index}"),
            "index",
            format!("vCPU {index} was there at boot; only hot-plugged vCPUs can be removed"),
        ));
    }
    let id = cpu.props.device_id();
    let shared = &shared;
    eject(
        shared,
        &format!("unplug_cpu {index} ({id})"),
        &id,
        "QEMU still lists it; the guest did not release it",
        || async move { Ok(!present(shared, op).await?.iter().any(|c| c.index == index)) },
    )
    .await
}

#[async_trait]
impl CpuHotplugger for Cpus {
    async fn query_cpus(&self) -> vmkit_core::Result<Vec<CpuInfo>> {
        let shared = self.shared("query_cpus")?;
        shared
            .state
            .require("query_cpus", &[VmState::Running, VmState::Paused])?;
        shared
            .hotplug
            .run(&shared, "query_cpus".into(), query(Arc::clone(&shared)))
            .await
    }

    async fn hotplug_cpu(&self) -> vmkit_core::Result<CpuInfo> {
        let shared = self.shared("hotplug_cpu")?;
        shared.state.require("hotplug_cpu", &[VmState::Running])?;
        shared
            .hotplug
            .run(
                &shared,
                "hotplug_cpu".into(),
                add_one(Arc::clone(&shared), None),
            )
            .await
    }

    async fn hotplug_cpu_at(&self, at: CpuTopology) -> vmkit_core::Result<CpuInfo> {
        let shared = self.shared("hotplug_cpu")?;
        shared.state.require("hotplug_cpu", &[VmState::Running])?;
        shared
            .hotplug
            .run(
                &shared,
                format!(
                    "hotplug_cpu_at socket={} core={} thread={}",
                    at.socket, at.core, at.thread
                ),
                add_one(Arc::clone(&shared), Some(at)),
            )
            .await
    }

    async fn unplug_cpu(&self, index: u32) -> vmkit_core::Result<()> {
        let shared = self.shared("unplug_cpu")?;
        shared.state.require("unplug_cpu", &[VmState::Running])?;
        shared
            .hotplug
            .run(
                &shared,
                format!("unplug_cpu {index}"),
                remove_one(Arc::clone(&shared), index),
            )
            .await
    }

    async fn set_vcpus(&self, count: u32) -> vmkit_core::Result<VcpuResize> {
        let shared = self.shared("set_vcpus")?;
        shared.state.require("set_vcpus", &[VmState::Running])?;
        let max = shared.config.resources.max_vcpus;
        if count == 0 || count > max {
            return Err(CoreError::bad_argument(
                format!("set_vcpus {count}"),
                "count",
                format!("must be within 1..={max} (max_vcpus)"),
            ));
        }
        let job_shared = Arc::clone(&shared);
        shared
            .hotplug
            .run(&shared, format!("set_vcpus {count}"), async move {
                resize(job_shared, count).await
            })
            .await
    }
}

/// Adds or removes vCPUs (newest first) until `count` are present and online.
async fn resize(shared: Arc<Shared>, count: u32) -> vmkit_core::Result<VcpuResize> {
    let before = u32::try_from(present(&shared, "set_vcpus").await?.len()).unwrap_or(u32::MAX);
    let mut failures = Vec::new();
    let mut now = before;
    while now < count {
        match add_one(Arc::clone(&shared), None).await {
            Ok(_) => now += 1,
            Err(error) => {
                failures.push(CpuFailure { index: now, error });
                break;
            }
        }
    }
    while now > count {
        let cpus = present(&shared, "set_vcpus").await?;
        let Some(newest) = cpus
            .iter()
            .filter(|c| c.qom_path.contains(CPU_ID_PREFIX))
            .map(|c| c.index)
            .max()
        else {
            break;
        };
        match remove_one(Arc::clone(&shared), newest).await {
            Ok(()) => now -= 1,
            Err(error) => {
                failures.push(CpuFailure {
                    index: newest,
                    error,
                });
                break;
            }
        }
    }
    Ok(VcpuResize {
        requested: count,
        before,
        achieved: now,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `query-hotpluggable-cpus` of QEMU 10 for `-smp 1,maxcpus=3` after core 2 was
    /// plugged: highest core first, present ones with their qom-path.
    fn slots() -> Vec<Slot> {
        serde_json::from_value(json!([
            {"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "qom-path": "/machine/peripheral/vmkit-cpu0-2-0",
             "props": {"socket-id": 0, "core-id": 2, "thread-id": 0}},
            {"type": "qemu64-x86_64-cpu", "vcpus-count": 1,
             "props": {"socket-id": 0, "core-id": 1, "thread-id": 0}},
            {"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]",
             "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}}
        ]))
        .unwrap()
    }

    fn at(core: u32) -> Option<CpuTopology> {
        Some(CpuTopology {
            socket: 0,
            core,
            thread: 0,
        })
    }

    #[test]
    fn a_slot_is_the_named_one_or_the_lowest_free_and_refusals_have_their_kind() {
        let all = slots();
        assert_eq!(pick(&all, None, 3).unwrap().props.core, 1);
        assert_eq!(pick(&all, at(1), 3).unwrap().props.core, 1);
        let taken = pick(&all, at(2), 3).unwrap_err();
        assert!(matches!(taken, CoreError::BadArgument { .. }), "{taken:?}");
        let missing = pick(&all, at(7), 3).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "hotplug_cpu_at socket=0 core=7 thread=0: not found: no such vCPU slot \
             (socket/core/thread: 0/0/0, 0/1/0, 0/2/0)"
        );
        let full: Vec<Slot> = all.into_iter().filter(|s| s.qom_path.is_some()).collect();
        let none_left = pick(&full, None, 2).unwrap_err();
        assert!(
            matches!(none_left, CoreError::Exhausted { .. }),
            "{none_left:?}"
        );
    }
}
