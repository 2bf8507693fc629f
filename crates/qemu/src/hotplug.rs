//! Hot-plug: one queue per VM, vCPU hot-plug ([`CpuHotplugger`]) and memory hot-plug
//! ([`MemoryHotplugger`]: `object-add` of a RAM backend — memfd, shared, when a
//! vhost-user daemon maps guest RAM — then `device_add pc-dimm`; any failure removes what
//! was created).
//!
//! Every hot-plug call on a VM runs as a job on the VM's queue, one after another (a
//! queue, not a lock held across QMP calls). A job ends early with a clear error when
//! the VM starts shutting down or is gone.
//!
//! vCPUs: `query-hotpluggable-cpus` gives the free slots, `device_add` fills the first
//! one (id `vmkit-cpu<socket>-<core>-<thread>`), and the agent onlines it; the call
//! returns once the guest reports it online. Unplug is `device_del`, confirmed by
//! `query-cpus-fast` no longer listing the CPU (one event is not trusted: GUEST.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep};
use vmkit_core::{
    CpuFailure, CpuHotplugger, CpuInfo, CpuTopology, DimmInfo, DiskConfig, Error as CoreError,
    MemoryHotplugger, MemoryInfo, NicBackend, NicConfig, VcpuResize, VmState,
};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{GuestInfoRequest, OnlineResourcesRequest, OnlineResourcesResponse};

use crate::error::Error;
use crate::instance::Shared;

/// How long a guest may take to online a new vCPU (measured 0.3–0.4 s under TCG).
const ONLINE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long QEMU and the guest may take to remove a vCPU.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(20);
/// While waiting for the guest to online something, every this many looks the agent
/// is asked to online it (the guest's own uevent helper usually does it first).
const ONLINE_NUDGE_EVERY: u32 = 10;
/// How often the guest or QEMU is asked again while waiting.
const POLL: Duration = Duration::from_millis(10);
/// The id prefix of hot-plugged vCPUs.
const CPU_ID_PREFIX: &str = "vmkit-cpu";

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The VM's hot-plug queue; its worker task starts with the first job.
#[derive(Default)]
pub(crate) struct Queue {
    tx: OnceLock<mpsc::UnboundedSender<Job>>,
}

impl Queue {
    fn sender(&self) -> &mpsc::UnboundedSender<Job> {
        self.tx.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    job.await;
                }
            });
            tx
        })
    }

    /// Runs `work` after the jobs queued before it. It ends with an error naming `op`
    /// when the VM begins shutting down first.
    pub(crate) async fn run<T, F>(
        &self,
        shared: &Arc<Shared>,
        op: String,
        work: F,
    ) -> vmkit_core::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = vmkit_core::Result<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let mut stopping = shared.cancel.subscribe();
        let job_op = op.clone();
        let job: Job = Box::pin(async move {
            let result = tokio::select! {
                result = work => result,
                _ = async { stopping.wait_for(|s| *s).await.map(|_| ()) } => {
                    Err(CoreError::backend(job_op, Error::ShuttingDown))
                }
            };
            let _ = reply.send(result);
        });
        if self.sender().send(job).is_err() {
            return Err(CoreError::backend(op, Error::ShuttingDown));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(CoreError::backend(op, Error::ShuttingDown)))
    }
}

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

/// The VM behind a hot-plugger; a dropped instance counts as shut down.
fn upgrade(shared: &Weak<Shared>, op: &'static str) -> vmkit_core::Result<Arc<Shared>> {
    shared.upgrade().ok_or(CoreError::InvalidState {
        op,
        state: VmState::Shutdown,
    })
}

fn qmp_err(op: &str, e: vmkit_qmp::Error) -> CoreError {
    CoreError::backend(op.to_owned(), Error::Qmp(e))
}

fn agent_err(op: &str, call: &'static str, e: &ttrpc::Error) -> CoreError {
    CoreError::backend(
        op.to_owned(),
        Error::Agent {
            call,
            cause: e.to_string(),
        },
    )
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

/// Runs the QMP query `command` and reads its answer as `T`.
async fn qmp_query<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    op: &str,
    command: &str,
) -> vmkit_core::Result<T> {
    let qmp = shared.qmp("hotplug")?;
    let value = qmp
        .execute_raw(command, None)
        .await
        .map_err(|e| qmp_err(op, e))?;
    serde_json::from_value(value).map_err(|e| {
        CoreError::backend(
            op.to_owned(),
            Error::Io {
                op: format!("read {command}"),
                source: std::io::Error::other(e),
            },
        )
    })
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

async fn agent(shared: &Arc<Shared>) -> vmkit_core::Result<AgentClient> {
    let client = crate::instance::cached_client(shared).await?;
    Ok(AgentClient::new(client))
}

async fn query(shared: Arc<Shared>) -> vmkit_core::Result<Vec<CpuInfo>> {
    let op = "query_cpus";
    let cpus = present(&shared, op).await?;
    let online = match agent(&shared).await {
        Ok(agent) => Some(guest_online(&agent, op).await?),
        Err(_) => None,
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

async fn add_one(shared: Arc<Shared>) -> vmkit_core::Result<CpuInfo> {
    let op = "hotplug_cpu";
    let all = slots(&shared, op).await?;
    let max = shared.config.resources.max_vcpus;
    let mut free: Vec<&Slot> = all.iter().filter(|s| s.qom_path.is_none()).collect();
    free.sort_by_key(|s| (s.props.socket, s.props.core, s.props.thread));
    let Some(slot) = free.first() else {
        return Err(CoreError::config(
            "resources.max_vcpus",
            format!("hotplug_cpu: all {max} vCPUs are present"),
        ));
    };
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
    let index = present(&shared, op)
        .await?
        .into_iter()
        .find(|c| c.props == slot.props)
        .map(|c| c.index)
        .ok_or_else(|| {
            CoreError::backend(
                op,
                Error::Io {
                    op: format!("find {id} after device_add"),
                    source: std::io::Error::other("QEMU does not list it"),
                },
            )
        })?;
    // The guest's uevent helper usually onlines it; the agent makes sure.
    let agent = agent(&shared).await?;
    let deadline = Instant::now() + ONLINE_TIMEOUT;
    for round in 0u32.. {
        if guest_online(&agent, op).await?.contains(&index) {
            break;
        }
        // The guest's own hotplug helper usually wins; the agent nudges every 10th look.
        if round % ONLINE_NUDGE_EVERY != ONLINE_NUDGE_EVERY - 1 {
            if Instant::now() >= deadline {
                return Err(CoreError::Timeout {
                    op: format!("hotplug_cpu: the guest onlining cpu{index} ({id})"),
                    after: ONLINE_TIMEOUT,
                });
            }
            sleep(POLL).await;
            continue;
        }
        let mut req = OnlineResourcesRequest::new();
        req.cpus = true;
        let resp = agent
            .online_resources(ctx(), &req)
            .await
            .map_err(|e| agent_err(op, "OnlineResources", &e))?;
        if let Some(failure) = resp
            .failures
            .iter()
            .find(|f| f.starts_with(&format!("cpu{index}:")))
        {
            return Err(CoreError::backend(
                op,
                Error::Agent {
                    call: "OnlineResources",
                    cause: failure.clone(),
                },
            ));
        }
        if Instant::now() >= deadline {
            return Err(CoreError::Timeout {
                op: format!("hotplug_cpu: the guest onlining cpu{index} ({id})"),
                after: ONLINE_TIMEOUT,
            });
        }
        sleep(POLL).await;
    }
    Ok(CpuInfo {
        index,
        topology: slot.props.topology(),
        device_id: Some(id),
        online: Some(true),
    })
}

async fn remove_one(shared: Arc<Shared>, index: u32) -> vmkit_core::Result<()> {
    let op = "unplug_cpu";
    let cpus = present(&shared, op).await?;
    let Some(cpu) = cpus.iter().find(|c| c.index == index) else {
        return Err(CoreError::config(
            "index",
            format!(
                "unplug_cpu: no vCPU {index} (present: {:?})",
                cpus.iter().map(|c| c.index).collect::<Vec<_>>()
            ),
        ));
    };
    if !cpu.qom_path.contains(CPU_ID_PREFIX) {
        return Err(CoreError::config(
            "index",
            format!(
                "unplug_cpu: vCPU {index} was there at boot; only hot-plugged vCPUs can be removed"
            ),
        ));
    }
    let id = cpu.props.device_id();
    let qmp = shared.qmp(op)?;
    qmp.execute_raw("device_del", Some(json!({ "id": id })))
        .await
        .map_err(|e| qmp_err(&format!("device_del {id}"), e))?;
    let deadline = Instant::now() + UNPLUG_TIMEOUT;
    loop {
        if !present(&shared, op).await?.iter().any(|c| c.index == index) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CoreError::Timeout {
                op: format!(
                    "unplug_cpu: QEMU still lists vCPU {index} ({id}); the guest did not release it"
                ),
                after: UNPLUG_TIMEOUT,
            });
        }
        sleep(POLL).await;
    }
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
            .run(&shared, "hotplug_cpu".into(), add_one(Arc::clone(&shared)))
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
            return Err(CoreError::config(
                "count",
                format!("set_vcpus {count}: must be within 1..={max} (max_vcpus)"),
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
        match add_one(Arc::clone(&shared)).await {
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

// --- Memory ---

/// The id prefix of hot-plugged DIMMs; the backend object is `<id>-ram`.
const DIMM_ID_PREFIX: &str = "vmkit-mem";
/// How long the guest may take to online a DIMM (measured ≈ 0.15 s under TCG).
const MEMORY_ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU and the guest may take to release a DIMM.
const MEMORY_UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// A DIMM of `query-memory-devices`.
#[derive(Debug, Clone, Deserialize)]
struct MemoryDevice {
    #[serde(rename = "type")]
    kind: String,
    data: DimmData,
}

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
    let devices: Vec<MemoryDevice> = qmp_query(shared, op, "query-memory-devices").await?;
    Ok(devices
        .into_iter()
        .filter(|d| d.kind == "dimm")
        .map(|d| DimmInfo {
            id: d.data.id.unwrap_or_default(),
            size_mib: d.data.size / MIB,
            slot: d.data.slot,
            address: d.data.addr,
        })
        .collect())
}

/// The guest's MemTotal and memory block size, in bytes.
async fn guest_memory(agent: &AgentClient, op: &str) -> vmkit_core::Result<(u64, u64)> {
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
                async move { add_memory(job_shared, size_mib, slot).await },
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
        return Err(CoreError::config(
            field,
            format!("{op}: not a multiple of the guest's memory block size ({block_mib} MiB)"),
        ));
    }
    let present = dimms(&shared, &op).await?;
    let plugged: u64 = present.iter().map(|d| d.size_mib).sum();
    let max = res.max_memory();
    if res.memory_mib + plugged + size_mib > max {
        return Err(CoreError::config(
            field,
            format!(
                "{op}: {} MiB boot + {plugged} MiB plugged + {size_mib} MiB exceeds max_memory_mib {max}",
                res.memory_mib
            ),
        ));
    }
    if present.len() >= res.memory_slots as usize {
        return Err(CoreError::config(
            "resources.memory_slots",
            format!("{op}: all {} DIMM slots are in use", res.memory_slots),
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
    let deadline = Instant::now() + MEMORY_ONLINE_TIMEOUT;
    let mut looks = 0u32;
    loop {
        let round = looks;
        looks = looks.wrapping_add(1);
        // The guest's own hotplug helper usually onlines it; the agent nudges every 10th look.
        let online = if round % ONLINE_NUDGE_EVERY == ONLINE_NUDGE_EVERY - 1 {
            let mut req = OnlineResourcesRequest::new();
            req.memory = true;
            agent
                .online_resources(ctx(), &req)
                .await
                .map_err(|e| agent_err(&op, "OnlineResources", &e))
        } else {
            Ok(OnlineResourcesResponse::new())
        };
        let grown = match online {
            Ok(resp) if !resp.failures.is_empty() => Err(CoreError::backend(
                op.clone(),
                Error::Agent {
                    call: "OnlineResources",
                    cause: resp.failures.join("; "),
                },
            )),
            Ok(_) => guest_memory(&agent, &op)
                .await
                .map(|(total, _)| total >= total_before + size_mib * MIB),
            Err(e) => Err(e),
        };
        let failure = match grown {
            Ok(true) => return Ok(id),
            Ok(false) if Instant::now() < deadline => {
                sleep(POLL).await;
                continue;
            }
            Ok(false) => CoreError::Timeout {
                op: format!("{op}: the guest onlining {id}"),
                after: MEMORY_ONLINE_TIMEOUT,
            },
            Err(e) => e,
        };
        // Roll back: the DIMM and its backend go again (best effort; reported in logs).
        if let Err(e) = remove_dimm(&shared, &id).await {
            tracing::warn!(%id, error = %e, "rollback of a DIMM the guest did not online failed");
        }
        return Err(failure);
    }
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
    let qmp = shared.qmp("unplug_memory")?;
    qmp.execute_raw("device_del", Some(json!({ "id": id })))
        .await
        .map_err(|e| qmp_err(&format!("device_del {id}"), e))?;
    let deadline = Instant::now() + MEMORY_UNPLUG_TIMEOUT;
    while dimms(shared, &op).await?.iter().any(|d| d.id == id) {
        if Instant::now() >= deadline {
            return Err(CoreError::Timeout {
                op: format!("{op}: QEMU still lists it; the guest did not release the memory"),
                after: MEMORY_UNPLUG_TIMEOUT,
            });
        }
        sleep(POLL).await;
    }
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
                let dimms = dimms(&shared, "query_memory").await?;
                let guest_total_mib = match agent(&shared).await {
                    Ok(agent) => Some(guest_memory(&agent, "query_memory").await?.0 / MIB),
                    Err(_) => None,
                };
                let res = &shared.config.resources;
                Ok(MemoryInfo {
                    base_mib: res.memory_mib,
                    plugged_mib: dimms.iter().map(|d| d.size_mib).sum(),
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
                let op = format!("unplug_memory {id}");
                let present = dimms(&job_shared, &op).await?;
                if !present.iter().any(|d| d.id == id) {
                    return Err(CoreError::config(
                        "id",
                        format!(
                            "{op}: no such DIMM (present: {:?})",
                            present.iter().map(|d| d.id.as_str()).collect::<Vec<_>>()
                        ),
                    ));
                }
                remove_dimm(&job_shared, &id).await
            })
            .await
    }
}

// --- Disks ---

/// How long the guest may take to show a hot-plugged disk or NIC (disks: 60–100 ms).
const DEVICE_VISIBLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the guest may take to release a disk on `device_del`.
const DEVICE_DELETED_TIMEOUT: Duration = Duration::from_secs(30);

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
        return Err(CoreError::config(
            "id",
            format!("{op}: duplicate device id {id:?} (already hot-plugged)"),
        ));
    }
    let ports = shared.options.hotplug_ports;
    let port = (0..ports)
        .map(|i| format!("{}{i}", crate::command::ROOT_PORT_PREFIX))
        .find(|p| hot.iter().all(|d| &d.port != p))
        .ok_or_else(|| {
            CoreError::config(
                "backend_options.hotplug_ports",
                format!("{op}: all {ports} hot-plug root ports are in use"),
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
    if let Err(e) = qmp.execute_raw("device_add", Some(device)).await {
        if let Err(del) = qmp
            .execute_raw("blockdev-del", Some(json!({ "node-name": node })))
            .await
        {
            tracing::warn!(%node, error = %del, "blockdev-del after a failed device_add failed");
        }
        return Err(qmp_err(
            &format!("device_add virtio-blk-pci {} on {port}", disk.id),
            e,
        ));
    }
    crate::instance::lock(&shared.hot_devices).push(HotDevice {
        id: disk.id.clone(),
        backend: HotBackend::Block(node),
        port,
    });
    let (Some(agent), Some(before)) = (agent, disks_before) else {
        return Ok(());
    };
    let serial = disk.serial.clone();
    until_guest_shows(&agent, &op, "the new disk", move |info| match &serial {
        Some(serial) => info.disks.iter().any(|d| &d.serial == serial),
        None => info.disks.len() > before,
    })
    .await
}

/// Polls the agent's GuestInfo until `seen` holds, within [`DEVICE_VISIBLE_TIMEOUT`];
/// the timeout names `what` the guest never showed.
async fn until_guest_shows(
    agent: &AgentClient,
    op: &str,
    what: &str,
    seen: impl Fn(&vmkit_proto::agent::GuestInfoResponse) -> bool,
) -> vmkit_core::Result<()> {
    let deadline = Instant::now() + DEVICE_VISIBLE_TIMEOUT;
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
                after: DEVICE_VISIBLE_TIMEOUT,
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
        return Err(CoreError::config(
            "id",
            format!(
                "{op}: no hot-plugged device with that id (cold-plugged devices stay for the VM's life)"
            ),
        ));
    };
    let mut events = shared.events.subscribe();
    let qmp = shared.qmp("unplug")?;
    qmp.execute_raw("device_del", Some(json!({ "id": id })))
        .await
        .map_err(|e| qmp_err(&format!("device_del {id}"), e))?;
    let deleted = tokio::time::timeout(DEVICE_DELETED_TIMEOUT, async {
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
                after: DEVICE_DELETED_TIMEOUT,
            });
        }
    }
    crate::instance::lock(&shared.hot_devices).retain(|d| d.id != id);
    match &device.backend {
        HotBackend::Block(node) => qmp
            .execute_raw("blockdev-del", Some(json!({ "node-name": node })))
            .await
            .map_err(|e| qmp_err(&format!("blockdev-del {node}"), e))?,
        HotBackend::Net { netdev, .. } => qmp
            .execute_raw("netdev_del", Some(json!({ "id": netdev })))
            .await
            .map_err(|e| qmp_err(&format!("netdev_del {netdev}"), e))?,
    };
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
    if let Err(e) = qmp.execute_raw("device_add", Some(device)).await {
        if let Err(del) = qmp
            .execute_raw("netdev_del", Some(json!({ "id": netdev })))
            .await
        {
            tracing::warn!(%netdev, error = %del, "netdev_del after a failed device_add failed");
        }
        return Err(qmp_err(
            &format!("device_add virtio-net-pci {} on {port}", nic.id),
            e,
        ));
    }
    crate::instance::lock(&shared.hot_devices).push(HotDevice {
        id: nic.id.clone(),
        backend: HotBackend::Net { netdev, _tap: tap },
        port,
    });
    let Ok(agent) = agent(&shared).await else {
        return Ok(());
    };
    let mac = mac.to_string();
    until_guest_shows(&agent, &op, &format!("a NIC with MAC {mac}"), |info| {
        info.nics.iter().any(|n| n.mac == mac)
    })
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
