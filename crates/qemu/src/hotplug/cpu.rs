//! vCPU hot-plug: `query-hotpluggable-cpus` gives the free slots, `device_add` fills
//! the first one (id `vmkit-cpu<socket>-<core>-<thread>`), and the agent onlines it;
//! the call returns once the guest reports it online. Unplug is `device_del`,
//! confirmed by `query-cpus-fast` no longer listing the CPU (one event is not trusted:
//! GUEST.md).
//!
//! Under TCG, QEMU gives every vCPU thread it ever starts a translation context and
//! never reuses an unplugged one's; a VM can therefore start at most `max_vcpus` vCPU
//! threads in its life. Plugging one more aborts QEMU 10.0, so vmkit refuses it with
//! `Unsupported` and QEMU keeps running. KVM has no such limit.

use vmkit_core::{Accel, CpuFailure, CpuInfo, CpuTopology, Error as CoreError, VcpuResize};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{GuestInfoResponse, WaitResourcesRequest};
use vmkit_qmp::qapi_qmp::CpuInstanceProperties;

use super::context::{Context, POLL, agent_err, ctx, guest_info, qmp_err, wait_in_guest};
use super::eject::eject;
use crate::BACKEND_NAME;
use crate::error::Error;
use crate::qmp::{CpuSlot, Device, PresentCpu};

/// The id prefix of hot-plugged vCPUs.
const CPU_ID_PREFIX: &str = "vmkit-cpu";

/// A vCPU's place as QMP writes it.
fn topology(props: &CpuInstanceProperties) -> CpuTopology {
    let id = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    CpuTopology {
        socket: id(props.socket_id),
        core: id(props.core_id),
        thread: id(props.thread_id),
    }
}

/// The device id vmkit gives the vCPU at `at`.
fn device_id(at: CpuTopology) -> String {
    format!("{CPU_ID_PREFIX}{}-{}-{}", at.socket, at.core, at.thread)
}

fn present_topology(cpu: &PresentCpu) -> CpuTopology {
    cpu.props.as_ref().map(topology).unwrap_or(CpuTopology {
        socket: 0,
        core: 0,
        thread: 0,
    })
}

fn index_of(cpu: &PresentCpu) -> u32 {
    u32::try_from(cpu.cpu_index).unwrap_or(u32::MAX)
}

fn hot_plugged(cpu: &PresentCpu) -> bool {
    cpu.qom_path.contains(CPU_ID_PREFIX)
}

async fn slots(ctx: &Context, op: &str) -> vmkit_core::Result<Vec<CpuSlot>> {
    ctx.qmp()
        .hotpluggable_cpus()
        .await
        .map_err(|e| qmp_err(op, e))
}

async fn present(ctx: &Context, op: &str) -> vmkit_core::Result<Vec<PresentCpu>> {
    ctx.qmp().cpus_fast().await.map_err(|e| qmp_err(op, e))
}

/// The CPUs the guest has online, through the agent.
async fn guest_online(agent: &AgentClient, op: &str) -> vmkit_core::Result<Vec<u32>> {
    guest_info(agent, op).await.map(|info| info.online_cpus)
}

/// Whether the guest has the vCPU QEMU lists as `index` at `at` online. By place when
/// the guest reports places (a vCPU plugged out of order gets the guest's lowest free
/// number, not QEMU's cpu-index), else by number.
fn guest_has(info: &GuestInfoResponse, index: u32, at: CpuTopology) -> bool {
    if info.online_places.is_empty() {
        return info.online_cpus.contains(&index);
    }
    info.online_places
        .iter()
        .any(|p| (p.socket, p.core, p.thread) == (at.socket, at.core, at.thread))
}

/// `query_cpus`: QEMU's vCPUs, and whether the guest has each online when it can say.
pub(crate) async fn query(ctx: &Context) -> vmkit_core::Result<Vec<CpuInfo>> {
    let op = "query_cpus";
    let cpus = present(ctx, op).await?;
    let guest = match ctx.agent_for_query().await {
        Some(agent) => Some(guest_info(&agent, op).await?),
        None => None,
    };
    Ok(cpus
        .iter()
        .map(|c| {
            let (index, topology) = (index_of(c), present_topology(c));
            CpuInfo {
                index,
                topology,
                device_id: hot_plugged(c).then(|| device_id(topology)),
                online: guest.as_ref().map(|info| guest_has(info, index, topology)),
            }
        })
        .collect())
}

/// The slot to fill: `at`, or the first free one.
fn pick(all: &[CpuSlot], at: Option<CpuTopology>, max: u32) -> vmkit_core::Result<&CpuSlot> {
    let Some(at) = at else {
        let mut free: Vec<&CpuSlot> = all.iter().filter(|s| s.qom_path.is_none()).collect();
        free.sort_by_key(|s| {
            let t = topology(&s.props);
            (t.socket, t.core, t.thread)
        });
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
    match all.iter().find(|s| topology(&s.props) == at) {
        None => {
            let mut slots: Vec<String> = all
                .iter()
                .map(|s| {
                    let t = topology(&s.props);
                    format!("{}/{}/{}", t.socket, t.core, t.thread)
                })
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

/// `hotplug_cpu` (`at: None`) and `hotplug_cpu_at`: plugs a vCPU and waits until the
/// guest has it online.
pub(crate) async fn add(ctx: &Context, at: Option<CpuTopology>) -> vmkit_core::Result<CpuInfo> {
    let op = "hotplug_cpu";
    let all = slots(ctx, op).await?;
    let max = ctx.limits().resources.max_vcpus;
    let slot = pick(&all, at, max)?;
    let place = topology(&slot.props);
    // A slot named out of order gets the guest's lowest free CPU number, not QEMU's
    // cpu-index: the guest is watched for one more online CPU instead (its CPUs now).
    let named = match at {
        Some(_) => {
            let agent = ctx.agent().await?;
            let before = guest_online(&agent, op).await?;
            Some((agent, before))
        }
        None => None,
    };
    tcg_has_room(ctx, max)?;
    let id = device_id(place);
    let device = Device::new(slot.type_.clone(), id.clone())
        .with("socket-id", place.socket)
        .with("core-id", place.core)
        .with("thread-id", place.thread);
    ctx.qmp().device_add(device).await.map_err(|e| {
        qmp_err(
            &format!(
                "device_add cpu socket={} core={} thread={}",
                place.socket, place.core, place.thread
            ),
            e,
        )
    })?;
    ctx.state().count_vcpu_thread();
    let index = present(ctx, op)
        .await?
        .iter()
        .find(|c| present_topology(c) == place)
        .map(index_of)
        .ok_or_else(|| {
            CoreError::backend(
                op,
                Error::NotListed {
                    what: format!("{id} after its device_add"),
                },
            )
        })?;
    until_guest_onlines(ctx, named, index, &id).await?;
    Ok(CpuInfo {
        index,
        topology: place,
        device_id: Some(id),
        online: Some(true),
    })
}

/// QEMU's multi-threaded TCG gives each vCPU thread a translation context and never
/// takes an unplugged vCPU's back: a VM can start at most `max` (max_vcpus) vCPU threads
/// in its life, and one more aborts QEMU (`tcg_register_thread: assertion failed:
/// (n < tcg_max_ctxs)`, QEMU 10.0). Refused instead.
fn tcg_has_room(ctx: &Context, max: u32) -> vmkit_core::Result<()> {
    let started = ctx.state().vcpu_threads();
    if ctx.limits().accel == Accel::Tcg && started >= max {
        return Err(CoreError::unsupported(
            "hotplug_cpu",
            BACKEND_NAME,
            format!(
                "under TCG QEMU starts at most max_vcpus ({max}) vCPU threads in a VM's life \
                 and never reuses an unplugged vCPU's; {started} have started, and one more \
                 would abort QEMU"
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
    ctx: &Context,
    named: Option<(AgentClient, Vec<u32>)>,
    index: u32,
    id: &str,
) -> vmkit_core::Result<()> {
    let op = "hotplug_cpu";
    let limit = ctx.limits().deadline;
    if let Some((agent, before)) = named {
        return until_one_more_online(&agent, op, &before, id, limit).await;
    }
    let agent = ctx.agent().await?;
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
/// online what is offline every [`POLL`], within `limit`.
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
        tokio::time::sleep(POLL).await;
    }
}

/// `unplug_cpu`: ejects hot-plugged vCPU `index`.
pub(crate) async fn remove(ctx: &Context, index: u32) -> vmkit_core::Result<()> {
    let op = "unplug_cpu";
    let cpus = present(ctx, op).await?;
    let Some(cpu) = cpus.iter().find(|c| index_of(c) == index) else {
        return Err(CoreError::not_found(
            format!("unplug_cpu {index}"),
            format!(
                "no vCPU {index} (present: {:?})",
                cpus.iter().map(index_of).collect::<Vec<_>>()
            ),
        ));
    };
    if !hot_plugged(cpu) {
        return Err(CoreError::bad_argument(
            format!("unplug_cpu {index}"),
            "index",
            format!("vCPU {index} was there at boot; only hot-plugged vCPUs can be removed"),
        ));
    }
    let id = device_id(present_topology(cpu));
    eject(
        ctx,
        &format!("unplug_cpu {index} ({id})"),
        &id,
        "QEMU still lists it; the guest did not release it",
        || async move { Ok(!present(ctx, op).await?.iter().any(|c| index_of(c) == index)) },
    )
    .await
}

/// `set_vcpus`: adds or removes vCPUs (newest first) until `count` are present and
/// online.
pub(crate) async fn resize(ctx: &Context, count: u32) -> vmkit_core::Result<VcpuResize> {
    let before = u32::try_from(present(ctx, "set_vcpus").await?.len()).unwrap_or(u32::MAX);
    let mut failures = Vec::new();
    let mut now = before;
    while now < count {
        match add(ctx, None).await {
            Ok(_) => now += 1,
            Err(error) => {
                failures.push(CpuFailure { index: now, error });
                break;
            }
        }
    }
    while now > count {
        let cpus = present(ctx, "set_vcpus").await?;
        let Some(newest) = cpus.iter().filter(|c| hot_plugged(c)).map(index_of).max() else {
            break;
        };
        match remove(ctx, newest).await {
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
    use serde_json::json;

    /// `query-hotpluggable-cpus` of QEMU 10 for `-smp 1,maxcpus=3` after core 2 was
    /// plugged: highest core first, present ones with their qom-path.
    fn slots() -> Vec<CpuSlot> {
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
        assert_eq!(topology(&pick(&all, None, 3).unwrap().props).core, 1);
        assert_eq!(topology(&pick(&all, at(1), 3).unwrap().props).core, 1);
        let taken = pick(&all, at(2), 3).unwrap_err();
        assert!(matches!(taken, CoreError::BadArgument { .. }), "{taken:?}");
        let missing = pick(&all, at(7), 3).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "hotplug_cpu_at socket=0 core=7 thread=0: not found: no such vCPU slot \
             (socket/core/thread: 0/0/0, 0/1/0, 0/2/0)"
        );
        let full: Vec<CpuSlot> = all.into_iter().filter(|s| s.qom_path.is_some()).collect();
        let none_left = pick(&full, None, 2).unwrap_err();
        assert!(
            matches!(none_left, CoreError::Exhausted { .. }),
            "{none_left:?}"
        );
    }
}
